"""A FUSE filesystem for tests that loses, on a simulated power cut, what was never made durable.

Like Jepsen's LazyFS, it sits over a backing directory and keeps everything written since
the last durability point in memory. A process using the mount sees normal POSIX semantics
(reads see its writes, renames happen at once); ``LazyFS.cut()`` drops everything that no
``fsync`` made durable, and the mount then shows only the durable state. ``kill -9`` tests
cannot catch a missing ``fsync`` (the kernel's page cache survives the process); this can.

The model (strict, per object, no ordering between objects):

* **File data and size** become durable only by ``fsync``/``fdatasync`` on that file. They
  also persist its mode, owner and times if those were set (``chmod``/``chown``/``utime``).
  Nothing else makes data durable: not ``close``, not ``sync(2)``/``syncfs`` (FUSE does not
  pass those on), not an ``fsync`` of its directory.
* **Directory entries** become durable only by ``fsync`` on the directory itself (open it
  ``O_RDONLY`` and ``fsync``; FUSE calls this ``fsyncdir``). That commits the directory's
  whole name -> inode map as it is at that moment: creates, unlinks, renames into and out
  of it, ``mkdir``/``rmdir``, hard links. So:

  - a new file that was fsynced but whose directory was not is gone after a cut;
  - a new file whose directory was fsynced but which itself never was is there, empty;
  - a rename not followed by an fsync of the directory is undone (the old name comes back
    with its durable content); an unlink likewise;
  - a new directory needs an fsync of its *parent* to exist after a cut (and an fsync of
    itself for its entries);
  - a cross-directory rename commits per side: fsyncing only the destination leaves the
    file under both names after a cut (like a hard link), fsyncing only the source loses
    it. A *directory* has a single durable parent: committing its new location also
    removes it from the old one, as a journalled rename would.

  This is stricter than ext4 (whose journal commits every earlier metadata change at the
  first fsync): an application that survives here survives there, not necessarily the
  reverse. SQLite passes as it is: it fsyncs the directory when it creates a journal or
  WAL file (which makes a new database's name durable too); in WAL mode
  ``synchronous=FULL`` keeps every commit and ``synchronous=NORMAL`` loses every commit
  since the last checkpoint, consistently.
* **Durable state is exactly the backing directory**, a plain tree: after ``unmount()`` or
  a cut you can open it without FUSE (e.g. the SQLite database). Objects that have durable
  content but no durable name yet (a new file that was fsynced before its directory) live
  in a hidden ``.lazyfs-staging`` folder of the backing directory, invisible through the
  mount and deleted on every start, the way fsck drops orphan inodes.

How a cut works: the filesystem runs in its own process (``python lazyfs.py serve``) with a
UNIX-socket control channel. ``cut()`` asks it to take its big lock (so no operation is half
applied: an ``fsync`` in progress completes or did not start) and to ``_exit`` while holding
it; the dead mount is detached with ``fusermount3 -uz`` and a fresh daemon is mounted on the
same mountpoint over the backing directory, so even the kernel's page and dentry caches of
the old mount are gone. Processes that still have files open on the old mount get
``ENOTCONN`` from every call on them, ``close`` included; a drill should ``kill -9`` them
first (``kill_holders()``), which is what a power cut does to them too. ``power_off(n)``
makes the filesystem fail every operation with ``EIO`` after ``n`` more sync calls, to stop
the durable state at an exact point (crashing at the Nth sync for N = 1..k covers every
distinct post-cut state, since durable state changes only at syncs).

Limits, on purpose or for now:

* No torn writes, no reordering inside one fsync, no lost fsync: an fsync is atomic and
  complete (real disks can be worse).
* ``statfs`` reports the backing filesystem; cached data is not counted as used space.
* Locks (``fcntl``/``flock``) are kept by the kernel, not the filesystem, and vanish with
  the old mount on a cut; extended attributes are not supported.
* Hard links work (``os.link``), but the kernel sees each name as its own inode (libfuse's
  high-level API): two names of one file mmapped at the same time are not coherent.
* All operations take one lock (Python would serialise them anyway). Requests carry up to
  1 MiB (libfuse3's max_write): 200 files of 100 KB-1 MB (105 MB), each written, fsynced,
  renamed and its directory fsynced, take ~1 s here. A file's volatile content is a
  ``bytearray`` loaded on its first write and dropped once it is clean and closed; clean
  files are read from the backing store.
* A rename that moves a directory under one of its own durable descendants (possible only
  with unsynced renames on both sides) fails its fsyncdir with ``EINVAL``.
* The daemon needs ``/dev/fuse`` and permission to mount (root here, see FIELD-NOTES);
  otherwise ``mount()`` raises ``FuseUnavailable`` saying why. It unmounts and exits by
  itself if the process that mounted it dies, so a killed test run leaves no mount.

Usage::

    with LazyFS(backing_dir, mountpoint) as fs:
        run_the_gateway(root=mountpoint)   # in a subprocess
        fs.power_off(after_syncs=n)        # optional: freeze durable state at sync n
        fs.kill_holders()                  # kill -9 whatever has files open there
        fs.cut()                           # power loss; mountpoint now shows durable state
        check_what_survived(mountpoint)    # via the mount, or backing_dir after unmount()
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

logger = logging.getLogger(__name__)

__all__ = [
    "STAGING_NAME",
    "FuseUnavailable",
    "LazyFS",
    "LazyFSError",
    "LazyFilesystem",
    "fuse_unavailable_reason",
]

STAGING_NAME = ".lazyfs-staging"
_ROOT_INO = 1
_FSNAME = "lazyfs"
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_FALLOC_ZERO_RANGE = 0x10
_MERGE_DIRTY_AT = 1024
_POLL_INTERVAL_S = 0.02
_CONTROL_TIMEOUT_S = 30.0
_LOG_TAIL_CHARS = 4000


class LazyFSError(RuntimeError):
    """The lazy filesystem misbehaved or was misused (not "FUSE is unavailable")."""


class FuseUnavailable(LazyFSError):
    """FUSE mounts are not possible here; the message says why (for a loud drill skip/fail)."""


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# --------------------------------------------------------------------------------------------
# The model: a path-based filesystem (the shape of the libfuse high-level API), usable without
# FUSE, which is how the unit-level tests drive it.
# --------------------------------------------------------------------------------------------


class _Node:
    """One inode: its volatile state, and where its durable state lives in the backing tree.

    ``dlinks`` are the durable (parent inode, name) entries that point at it; a file with no
    durable link has its durable object in staging (``staged``). A directory has at most one
    durable link (its durable parent) and is otherwise in staging; the root has neither.
    """

    __slots__ = (
        "atime_ns",
        "backing_ino",
        "ctime_ns",
        "data",
        "dentries",
        "dirty",
        "dlinks",
        "entries",
        "gid",
        "ino",
        "meta_dirty",
        "mode",
        "mtime_ns",
        "nlink",
        "opens",
        "parent",
        "size",
        "staged",
        "target",
        "trunc_to",
        "uid",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now_ns: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.atime_ns = self.mtime_ns = self.ctime_ns = now_ns
        # Volatile links: entries in volatile directories (a directory: 1 while linked).
        self.nlink = 0
        self.opens = 0
        self.dlinks: set[tuple[int, str]] = set()
        self.staged = False
        self.backing_ino = 0
        self.meta_dirty = False
        # Regular files: ``data`` is the volatile content when loaded (else it equals the
        # durable object, of ``size`` bytes); ``dirty`` are byte ranges written since the last
        # fsync and ``trunc_to`` the smallest size truncated to since then.
        self.size = 0
        self.data: bytearray | None = None
        self.dirty: list[tuple[int, int]] = []
        self.trunc_to: int | None = None
        # Directories: volatile and durable name -> inode maps (None: not read from disk yet).
        self.entries: dict[str, int] | None = None
        self.dentries: dict[str, int] = {}
        self.parent = 0
        # Symbolic links.
        self.target = ""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def data_dirty(self) -> bool:
        return bool(self.dirty) or self.trunc_to is not None

    @property
    def alive(self) -> bool:
        """Reachable through the mount or through an open handle."""
        return self.nlink > 0 or self.opens > 0


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


_F = TypeVar("_F", bound=Callable[..., Any])


def _operation(func: _F) -> _F:
    """Run a filesystem operation under the big lock, failing with EIO once powered off."""

    @functools.wraps(func)
    def wrapper(self: LazyFilesystem, *args: Any, **kwargs: Any) -> Any:
        with self.big_lock:
            if self.powered_off:
                raise _err(errno.EIO)
            return func(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class LazyFilesystem:
    """The lazy filesystem's state and operations, in the method names libfuse (mfusepy) calls.

    Paths are absolute within the mount ("/a/b"). Methods raise ``OSError`` with an errno on
    failure, which mfusepy returns to the kernel. The backing directory must not be changed
    by anyone else while this object is in use.
    """

    use_ns = True  # mfusepy: times are integer nanoseconds

    def __init__(
        self,
        backing_dir: str | os.PathLike[str],
        *,
        context: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.backing = os.path.abspath(backing_dir)
        self.staging = os.path.join(self.backing, STAGING_NAME)
        self._context = context or (lambda: (os.getuid(), os.getgid()))
        self.big_lock = threading.RLock()
        self.powered_off = False
        self.power_off_at: int | None = None
        self.fsync_calls = 0
        self.fsyncdir_calls = 0
        # Orphans from an earlier run are garbage, as after fsck.
        shutil.rmtree(self.staging, ignore_errors=True)
        os.mkdir(self.staging, 0o700)
        st = os.stat(self.backing)
        root = _Node(_ROOT_INO, st.st_mode, st.st_uid, st.st_gid, time.time_ns())
        root.atime_ns, root.mtime_ns, root.ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        root.nlink = 1
        self.nodes: dict[int, _Node] = {_ROOT_INO: root}
        self._by_backing_ino: dict[int, int] = {}
        self._handles: dict[int, int] = {}
        self._next_ino = _ROOT_INO + 1
        self._next_fh = 1

    # -- bookkeeping --------------------------------------------------------------------------

    @property
    def sync_calls(self) -> int:
        return self.fsync_calls + self.fsyncdir_calls

    def _new_node(self, mode: int) -> _Node:
        uid, gid = self._context()
        node = _Node(self._next_ino, mode, uid, gid, time.time_ns())
        self._next_ino += 1
        self.nodes[node.ino] = node
        return node

    def _staged_path(self, node: _Node) -> str:
        return os.path.join(self.staging, str(node.ino))

    def _dir_path(self, node: _Node) -> str:
        """Where a directory's durable entries live in the backing tree."""
        if node.ino == _ROOT_INO:
            return self.backing
        if node.dlinks:
            parent, name = next(iter(node.dlinks))
            return os.path.join(self._dir_path(self.nodes[parent]), name)
        return self._staged_path(node)

    def _object_path(self, node: _Node) -> str:
        """A backing path holding the node's durable content."""
        if node.is_dir:
            return self._dir_path(node)
        if node.staged:
            return self._staged_path(node)
        parent, name = min(node.dlinks)
        return os.path.join(self._dir_path(self.nodes[parent]), name)

    def _remember_backing(self, node: _Node, path: str) -> None:
        node.backing_ino = os.lstat(path).st_ino
        self._by_backing_ino[node.backing_ino] = node.ino

    def _drop(self, node: _Node) -> None:
        del self.nodes[node.ino]
        if self._by_backing_ino.get(node.backing_ino) == node.ino:
            del self._by_backing_ino[node.backing_ino]

    def _entries(self, node: _Node) -> dict[str, int]:
        """A directory's volatile entries, read from its backing directory on first use."""
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if node.entries is not None:
            return node.entries
        entries: dict[str, int] = {}
        with os.scandir(self._dir_path(node)) as it:
            for entry in it:
                if node.ino == _ROOT_INO and entry.name == STAGING_NAME:
                    continue
                st = entry.stat(follow_symlinks=False)
                known = None if stat.S_ISDIR(st.st_mode) else self._by_backing_ino.get(st.st_ino)
                if known is None:
                    child = _Node(self._next_ino, st.st_mode, st.st_uid, st.st_gid, 0)
                    self._next_ino += 1
                    self.nodes[child.ino] = child
                    child.atime_ns, child.mtime_ns = st.st_atime_ns, st.st_mtime_ns
                    child.ctime_ns = st.st_ctime_ns
                    if child.is_dir:
                        child.nlink = 1
                        child.parent = node.ino
                    else:
                        # Links in directories not read yet count too: the tree is durable.
                        child.nlink = st.st_nlink
                        child.size = st.st_size
                        child.backing_ino = st.st_ino
                        self._by_backing_ino[st.st_ino] = child.ino
                        if stat.S_ISLNK(st.st_mode):
                            child.target = os.readlink(entry.path)
                    known = child.ino
                self.nodes[known].dlinks.add((node.ino, entry.name))
                entries[entry.name] = known
        node.entries = entries
        node.dentries = dict(entries)
        return entries

    def _lookup(self, path: str | None) -> _Node:
        if path is None:
            raise _err(errno.EBADF)
        node = self.nodes[_ROOT_INO]
        for part in path.split("/"):
            if not part or part == ".":
                continue
            ino = self._entries(node).get(part)
            if ino is None:
                raise _err(errno.ENOENT)
            node = self.nodes[ino]
        return node

    def _lookup_parent(self, path: str) -> tuple[_Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._lookup(head or "/")
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        if not name or name in (".", ".."):
            raise _err(errno.EINVAL)
        if parent.ino == _ROOT_INO and name == STAGING_NAME:
            raise _err(errno.EPERM)
        return parent, name

    def _node_for(self, path: str | None, fh: int | None) -> _Node:
        if fh:
            ino = self._handles.get(fh)
            if ino is None:
                raise _err(errno.EBADF)
            return self.nodes[ino]
        return self._lookup(path)

    def _open_handle(self, node: _Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = node.ino
        node.opens += 1
        return fh

    def _close_handle(self, fh: int) -> None:
        ino = self._handles.pop(fh, None)
        if ino is None:
            return
        node = self.nodes[ino]
        node.opens -= 1
        if node.opens == 0 and not node.data_dirty:
            node.data = None  # clean and closed: the durable object has it
        self._gc(node)

    def _touch(self, node: _Node, *, content: bool = True) -> None:
        now = time.time_ns()
        node.ctime_ns = now
        if content:
            node.mtime_ns = now

    def _load(self, node: _Node) -> bytearray:
        """The file's volatile content, read from its durable object on first modification."""
        if node.data is None:
            with open(self._object_path(node), "rb") as f:
                node.data = bytearray(f.read())
            node.size = len(node.data)
        return node.data

    def _mark_dirty(self, node: _Node, start: int, end: int) -> None:
        if end > start:
            node.dirty.append((start, end))
            if len(node.dirty) > _MERGE_DIRTY_AT:
                node.dirty = _merge_ranges(node.dirty)

    def _resize(self, node: _Node, length: int) -> None:
        data = self._load(node)
        if length < len(data):
            del data[length:]
            node.trunc_to = length if node.trunc_to is None else min(node.trunc_to, length)
        elif length > len(data):
            self._mark_dirty(node, len(data), length)
            data.extend(bytes(length - len(data)))
        node.size = length

    # -- making things durable ---------------------------------------------------------------

    def _persist_file(self, node: _Node) -> None:
        if node.is_reg and node.data_dirty and node.data is not None:
            data = node.data
            fd = os.open(self._object_path(node), os.O_WRONLY)
            try:
                if node.trunc_to is not None:
                    os.ftruncate(fd, node.trunc_to)
                view = memoryview(data)
                for start, end in _merge_ranges(node.dirty):
                    end = min(end, len(data))
                    while start < end:
                        start += os.pwrite(fd, view[start:end], start)
                view.release()
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
            node.dirty = []
            node.trunc_to = None
        self._persist_meta(node)

    def _persist_meta(self, node: _Node) -> None:
        if not node.meta_dirty:
            return
        path = self._object_path(node)
        if not stat.S_ISLNK(node.mode):
            os.chmod(path, stat.S_IMODE(node.mode))
        os.chown(path, node.uid, node.gid, follow_symlinks=False)
        os.utime(path, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=False)
        node.meta_dirty = False

    def _persist_dir(self, node: _Node) -> None:
        """Make the directory's current entries its durable entries (fsyncdir)."""
        if node.entries is not None:
            new, old = node.entries, node.dentries
            changed = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
            touched = [old[n] for n in changed if n in old] + [new[n] for n in changed if n in new]
            for name in changed:
                if name in old:
                    self._detach(node, name)
            for name in changed:
                if name in new:
                    self._attach(node, name, new[name])
            for ino in touched:
                if ino in self.nodes:
                    self._gc(self.nodes[ino])
        self._persist_meta(node)

    def _detach(self, parent: _Node, name: str) -> None:
        """Remove a durable entry; keep the object in staging while it may still be needed."""
        node = self.nodes[parent.dentries.pop(name)]
        path = os.path.join(self._dir_path(parent), name)
        node.dlinks.discard((parent.ino, name))
        if not node.is_dir and (node.dlinks or node.staged):
            os.unlink(path)
        else:
            os.rename(path, self._staged_path(node))
            node.staged = True

    def _attach(self, parent: _Node, name: str, ino: int) -> None:
        """Add a durable entry pointing at an existing object."""
        node = self.nodes[ino]
        target = os.path.join(self._dir_path(parent), name)
        if node.is_dir:
            if node.dlinks:  # one durable parent: committing the new place leaves the old one
                old_parent, old_name = node.dlinks.pop()
                source = os.path.join(self._dir_path(self.nodes[old_parent]), old_name)
                del self.nodes[old_parent].dentries[old_name]
            else:
                source = self._staged_path(node)
            os.rename(source, target)
            node.staged = False
        else:
            os.link(self._object_path(node), target, follow_symlinks=False)
        node.dlinks.add((parent.ino, name))
        parent.dentries[name] = ino

    def _gc(self, node: _Node) -> None:
        """Drop staging copies and nodes that neither the mount nor the durable tree needs."""
        if node.ino == _ROOT_INO or node.ino not in self.nodes:
            return
        if not node.is_dir:
            if node.dlinks and node.staged:
                os.unlink(self._staged_path(node))
                node.staged = False
            if not node.alive:
                node.data, node.dirty, node.trunc_to = None, [], None
                if not node.dlinks:
                    if node.staged:
                        os.unlink(self._staged_path(node))
                    self._drop(node)
            return
        if not node.alive and not node.dlinks:
            # Durably unreachable and gone from the mount: its durable entries go with it.
            for name in sorted(node.dentries):
                child = self.nodes[node.dentries[name]]
                self._detach(node, name)
                self._gc(child)
            os.rmdir(self._staged_path(node))
            self._drop(node)

    def _count_sync(self, *, directory: bool) -> None:
        if directory:
            self.fsyncdir_calls += 1
        else:
            self.fsync_calls += 1
        if self.power_off_at is not None and self.sync_calls >= self.power_off_at:
            self.powered_off = True
            logger.info("lazyfs: powered off after sync call %d", self.sync_calls)

    # -- control ------------------------------------------------------------------------------

    def power_off(self, after_syncs: int = 0) -> None:
        """Fail every operation with EIO once ``after_syncs`` more sync calls have completed."""
        with self.big_lock:
            self.power_off_at = self.sync_calls + after_syncs
            if after_syncs <= 0:
                self.powered_off = True

    def sync_all(self) -> None:
        """Make everything durable (what a clean unmount of a real filesystem does)."""
        with self.big_lock:
            for node in list(self.nodes.values()):
                if not node.is_dir:
                    self._persist_file(node)
            pending = [self.nodes[_ROOT_INO]]
            while pending:
                node = pending.pop(0)
                self._persist_dir(node)
                for ino in (node.entries or {}).values():
                    if self.nodes[ino].is_dir:
                        pending.append(self.nodes[ino])

    def stats(self) -> dict[str, Any]:
        with self.big_lock:
            dirty = [n for n in self.nodes.values() if n.is_reg and n.data_dirty]
            pending_dirs = [
                n
                for n in self.nodes.values()
                if n.is_dir and n.entries is not None and n.entries != n.dentries
            ]
            return {
                "fsync_calls": self.fsync_calls,
                "fsyncdir_calls": self.fsyncdir_calls,
                "sync_calls": self.sync_calls,
                "dirty_files": len(dirty),
                "dirty_bytes": sum(n.size for n in dirty),
                "dirs_with_unsynced_entries": len(pending_dirs),
                "nodes": len(self.nodes),
                "open_handles": len(self._handles),
                "powered_off": self.powered_off,
            }

    # -- libfuse operations -------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        """libfuse3 start-up: our inode numbers, real unlink of open files, safe caching.

        ``direct_io`` stays off: SQLite mmaps its -shm file shared and writable. libfuse's
        high-level API gives each name its own kernel inode, so two hard links of one file
        have separate page and attribute caches: ``attr_timeout=0`` makes stat() ask us every
        time, and ``auto_cache`` drops a name's cached pages on open when the file changed
        (a cut replaces the whole mount, and every cache with it).
        """
        if config is not None:
            config.use_ino = 1
            config.hard_remove = 1
            config.nullpath_ok = 1
            config.kernel_cache = 0
            config.auto_cache = 1
            config.attr_timeout = 0.0
            config.direct_io = 0

    @_operation
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        node = self._node_for(path, fh)
        if node.is_dir:
            if node.entries is None and node.ino != _ROOT_INO and node.dlinks:
                nlink = os.lstat(self._dir_path(node)).st_nlink
            else:
                subdirs = sum(1 for i in self._entries(node).values() if self.nodes[i].is_dir)
                nlink = 2 + subdirs
            size = 4096
        else:
            nlink = node.nlink
            size = len(node.data) if node.data is not None else node.size
        return {
            "st_ino": node.ino,
            "st_mode": node.mode,
            "st_nlink": nlink,
            "st_uid": node.uid,
            "st_gid": node.gid,
            "st_size": size,
            "st_blksize": 4096,
            "st_blocks": (size + 511) // 512,
            "st_atime": node.atime_ns,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.ctime_ns,
        }

    @_operation
    def readlink(self, path: str) -> str:
        node = self._lookup(path)
        if not stat.S_ISLNK(node.mode):
            raise _err(errno.EINVAL)
        return node.target

    @_operation
    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.backing)
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        result = {key: getattr(sv, key) for key in keys}
        result["f_favail"] = sv.f_favail
        result["f_namemax"] = min(sv.f_namemax, 255)
        return result

    @_operation
    def create(self, path: str, mode: int, flags: int = 0) -> int:
        parent, name = self._lookup_parent(path)
        entries = self._entries(parent)
        if name in entries:  # the kernel looked it up first; be correct anyway
            if flags & os.O_EXCL:
                raise _err(errno.EEXIST)
            node = self.nodes[entries[name]]
            if node.is_dir:
                raise _err(errno.EISDIR)
            if flags & os.O_TRUNC:
                self._resize(node, 0)
            return self._open_handle(node)
        node = self._new_node(stat.S_IFREG | stat.S_IMODE(mode))
        obj = self._staged_path(node)
        os.close(os.open(obj, os.O_CREAT | os.O_EXCL | os.O_WRONLY, stat.S_IMODE(mode)))
        os.chown(obj, node.uid, node.gid)
        self._remember_backing(node, obj)
        node.staged = True
        node.data = bytearray()
        node.nlink = 1
        entries[name] = node.ino
        self._touch(parent)
        return self._open_handle(node)

    @_operation
    def mknod(self, path: str, mode: int, dev: int) -> int:
        parent, name = self._lookup_parent(path)
        entries = self._entries(parent)
        if name in entries:
            raise _err(errno.EEXIST)
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise _err(errno.EPERM)
        node = self._new_node(mode)
        obj = self._staged_path(node)
        os.mknod(obj, mode, dev)
        self._remember_backing(node, obj)
        node.staged = True
        node.nlink = 1
        entries[name] = node.ino
        self._touch(parent)
        return 0

    @_operation
    def open(self, path: str, flags: int) -> int:
        node = self._lookup(path)
        if node.is_dir:
            raise _err(errno.EISDIR)
        if flags & os.O_TRUNC and node.is_reg:
            self._resize(node, 0)
            self._touch(node)
        return self._open_handle(node)

    @_operation
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        node = self._node_for(path, fh)
        if node.data is not None:
            return bytes(node.data[offset : offset + size])
        fd = os.open(self._object_path(node), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    @_operation
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        node = self._node_for(path, fh)
        buf = self._load(node)
        end = offset + len(data)
        if offset > len(buf):
            self._mark_dirty(node, len(buf), offset)
            buf.extend(bytes(offset - len(buf)))
        buf[offset:end] = data
        node.size = len(buf)
        self._mark_dirty(node, offset, end)
        self._touch(node)
        return len(data)

    @_operation
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        node = self._node_for(path, fh)
        if node.is_dir:
            raise _err(errno.EISDIR)
        if not node.is_reg:
            raise _err(errno.EINVAL)
        self._resize(node, length)
        self._touch(node)
        return 0

    @_operation
    def fallocate(self, path: str | None, mode: int, offset: int, length: int, fh: int) -> int:
        node = self._node_for(path, fh)
        if not node.is_reg:
            raise _err(errno.ENODEV)
        end = offset + length
        keep_size = bool(mode & _FALLOC_KEEP_SIZE)
        kind = mode & ~_FALLOC_KEEP_SIZE
        if kind == 0:
            if not keep_size and end > node.size:
                self._resize(node, end)
                self._touch(node)
            return 0
        if kind in (_FALLOC_PUNCH_HOLE, _FALLOC_ZERO_RANGE):
            if kind == _FALLOC_PUNCH_HOLE and not keep_size:
                raise _err(errno.EOPNOTSUPP)
            data = self._load(node)
            if not keep_size and end > len(data):
                self._resize(node, end)
            stop = min(end, len(data))
            if offset < stop:
                data[offset:stop] = bytes(stop - offset)
                self._mark_dirty(node, offset, stop)
            self._touch(node)
            return 0
        raise _err(errno.EOPNOTSUPP)

    @_operation
    def flush(self, path: str | None, fh: int) -> int:
        return 0

    @_operation
    def release(self, path: str | None, fh: int) -> int:
        self._close_handle(fh)
        return 0

    @_operation
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self._persist_file(self._node_for(path, fh))
        self._count_sync(directory=False)
        return 0

    @_operation
    def opendir(self, path: str) -> int:
        node = self._lookup(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        return self._open_handle(node)

    @_operation
    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        node = self._node_for(path, fh)
        parent = self.nodes.get(node.parent, node) if node.ino != _ROOT_INO else node
        listing = [
            (".", {"st_mode": node.mode, "st_ino": node.ino}, 0),
            ("..", {"st_mode": parent.mode, "st_ino": parent.ino}, 0),
        ]
        for name, ino in self._entries(node).items():
            child = self.nodes[ino]
            listing.append((name, {"st_mode": child.mode, "st_ino": child.ino}, 0))
        return listing

    @_operation
    def releasedir(self, path: str | None, fh: int) -> int:
        self._close_handle(fh)
        return 0

    @_operation
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self._persist_dir(self._node_for(path, fh))
        self._count_sync(directory=True)
        return 0

    @_operation
    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self._lookup_parent(path)
        entries = self._entries(parent)
        if name in entries:
            raise _err(errno.EEXIST)
        node = self._new_node(stat.S_IFDIR | stat.S_IMODE(mode))
        obj = self._staged_path(node)
        os.mkdir(obj, stat.S_IMODE(mode))
        os.chown(obj, node.uid, node.gid)
        node.staged = True
        node.entries = {}
        node.dentries = {}
        node.parent = parent.ino
        node.nlink = 1
        entries[name] = node.ino
        self._touch(parent)
        return 0

    @_operation
    def unlink(self, path: str) -> int:
        parent, name = self._lookup_parent(path)
        entries = self._entries(parent)
        ino = entries.get(name)
        if ino is None:
            raise _err(errno.ENOENT)
        node = self.nodes[ino]
        if node.is_dir:
            raise _err(errno.EISDIR)
        del entries[name]
        node.nlink -= 1
        self._touch(node, content=False)
        self._touch(parent)
        self._gc(node)
        return 0

    @_operation
    def rmdir(self, path: str) -> int:
        parent, name = self._lookup_parent(path)
        entries = self._entries(parent)
        ino = entries.get(name)
        if ino is None:
            raise _err(errno.ENOENT)
        node = self.nodes[ino]
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if self._entries(node):
            raise _err(errno.ENOTEMPTY)
        del entries[name]
        node.nlink = 0
        self._touch(parent)
        self._gc(node)
        return 0

    def _is_within(self, node: _Node, ancestor: _Node) -> bool:
        """Whether directory ``node`` is ``ancestor`` or below it in the volatile tree."""
        while True:
            if node.ino == ancestor.ino:
                return True
            if node.ino == _ROOT_INO or node.parent not in self.nodes:
                return False
            node = self.nodes[node.parent]

    @_operation
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if flags & ~(_RENAME_NOREPLACE | _RENAME_EXCHANGE) or flags == (
            _RENAME_NOREPLACE | _RENAME_EXCHANGE
        ):
            raise _err(errno.EINVAL)
        src_parent, src_name = self._lookup_parent(old)
        dst_parent, dst_name = self._lookup_parent(new)
        src_entries, dst_entries = self._entries(src_parent), self._entries(dst_parent)
        src_ino = src_entries.get(src_name)
        if src_ino is None:
            raise _err(errno.ENOENT)
        src = self.nodes[src_ino]
        dst_ino = dst_entries.get(dst_name)
        if flags & _RENAME_NOREPLACE and dst_ino is not None:
            raise _err(errno.EEXIST)
        if src.is_dir and self._is_within(dst_parent, src):
            raise _err(errno.EINVAL)
        if flags & _RENAME_EXCHANGE:
            if dst_ino is None:
                raise _err(errno.ENOENT)
            dst = self.nodes[dst_ino]
            if dst.is_dir and self._is_within(src_parent, dst):
                raise _err(errno.EINVAL)
            src_entries[src_name], dst_entries[dst_name] = dst_ino, src_ino
            if src.is_dir:
                src.parent = dst_parent.ino
            if dst.is_dir:
                dst.parent = src_parent.ino
            for touched in (src, dst):
                self._touch(touched, content=False)
            self._touch(src_parent)
            self._touch(dst_parent)
            return 0
        if dst_ino == src_ino:
            return 0
        dst_node = self.nodes[dst_ino] if dst_ino is not None else None
        if dst_node is not None:
            if src.is_dir and not dst_node.is_dir:
                raise _err(errno.ENOTDIR)
            if not src.is_dir and dst_node.is_dir:
                raise _err(errno.EISDIR)
            if dst_node.is_dir and self._entries(dst_node):
                raise _err(errno.ENOTEMPTY)
        del src_entries[src_name]
        dst_entries[dst_name] = src_ino
        if src.is_dir:
            src.parent = dst_parent.ino
        self._touch(src, content=False)
        self._touch(src_parent)
        self._touch(dst_parent)
        if dst_node is not None:
            dst_node.nlink = 0 if dst_node.is_dir else dst_node.nlink - 1
            self._touch(dst_node, content=False)
            self._gc(dst_node)
        return 0

    @_operation
    def link(self, target: str, source: str) -> int:
        """Hard link: ``target`` is the new name, ``source`` the existing file (mfusepy order)."""
        node = self._lookup(source)
        if node.is_dir:
            raise _err(errno.EPERM)
        parent, name = self._lookup_parent(target)
        entries = self._entries(parent)
        if name in entries:
            raise _err(errno.EEXIST)
        entries[name] = node.ino
        node.nlink += 1
        self._touch(node, content=False)
        self._touch(parent)
        return 0

    @_operation
    def symlink(self, target: str, source: str) -> int:
        """Symbolic link: ``target`` is the new name, ``source`` its content (mfusepy order)."""
        parent, name = self._lookup_parent(target)
        entries = self._entries(parent)
        if name in entries:
            raise _err(errno.EEXIST)
        node = self._new_node(stat.S_IFLNK | 0o777)
        obj = self._staged_path(node)
        os.symlink(source, obj)
        os.chown(obj, node.uid, node.gid, follow_symlinks=False)
        self._remember_backing(node, obj)
        node.target = source
        node.staged = True
        node.nlink = 1
        entries[name] = node.ino
        self._touch(parent)
        return 0

    @_operation
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        node = self._node_for(path, fh)
        node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        node.meta_dirty = True
        self._touch(node, content=False)
        return 0

    @_operation
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        node = self._node_for(path, fh)
        if uid != -1:
            node.uid = uid
        if gid != -1:
            node.gid = gid
        node.meta_dirty = True
        self._touch(node, content=False)
        return 0

    @_operation
    def utimens(
        self, path: str | None, times: tuple[int | None, int | None], fh: int | None = None
    ) -> int:
        """Set times; None in ``times`` leaves one unchanged (UTIME_OMIT)."""
        node = self._node_for(path, fh)
        atime, mtime = times
        if atime is not None:
            node.atime_ns = atime
        if mtime is not None:
            node.mtime_ns = mtime
        node.meta_dirty = True
        self._touch(node, content=False)
        return 0


# --------------------------------------------------------------------------------------------
# The daemon: mounts a LazyFilesystem with mfusepy and serves the control socket.
# --------------------------------------------------------------------------------------------


def _make_fuse_class(mfusepy: Any) -> Any:
    """mfusepy's FUSE, passing the file handle and flags on that its libfuse3 wrappers drop."""

    def _fh(fip: Any) -> int | None:
        return fip.contents.fh if fip else None

    def _decode(self: Any, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def _spec(ts: Any) -> int | None:
        if ts.tv_nsec == _UTIME_OMIT:
            return None
        if ts.tv_nsec == _UTIME_NOW:
            return time.time_ns()
        return int(ts.tv_sec) * 10**9 + int(ts.tv_nsec)

    class _FUSE(mfusepy.FUSE):
        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return int(self.operations.rename(_decode(self, old), _decode(self, new), flags))

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            return int(self.operations.truncate(_decode(self, path), length, _fh(fip)))

        def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
            return int(self.operations.chmod(_decode(self, path), mode, _fh(fip)))

        def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
            uid = -1 if uid == 0xFFFFFFFF else uid
            gid = -1 if gid == 0xFFFFFFFF else gid
            return int(self.operations.chown(_decode(self, path), uid, gid, _fh(fip)))

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            if buf:
                times = (_spec(buf.contents.actime), _spec(buf.contents.modtime))
            else:
                now = time.time_ns()
                times = (now, now)
            return int(self.operations.utimens(_decode(self, path), times, _fh(fip)))

    return _FUSE


class _ControlServer(threading.Thread):
    """JSON-lines requests over a UNIX socket: ping, stats, sync_all, power_off, cut."""

    def __init__(self, path: str, fs: LazyFilesystem, mounted: threading.Event) -> None:
        super().__init__(name="lazyfs-control", daemon=True)
        self._fs = fs
        self._mounted = mounted
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(8)

    def run(self) -> None:
        while True:
            conn, _ = self._sock.accept()
            with conn:
                try:
                    self._serve_one(conn)
                except Exception:
                    logger.exception("lazyfs control request failed")

    def _serve_one(self, conn: socket.socket) -> None:
        request = json.loads(conn.makefile("rb").readline() or b"{}")
        op = request.get("op")
        reply: dict[str, Any] = {"ok": True}
        if op == "ping":
            reply["mounted"] = self._mounted.is_set()
            reply["pid"] = os.getpid()
        elif op == "stats":
            reply["stats"] = self._fs.stats()
        elif op == "sync_all":
            self._fs.sync_all()
        elif op == "power_off":
            self._fs.power_off(int(request.get("after_syncs", 0)))
        elif op == "cut":
            # Hold the big lock until the process is gone: no operation runs half-applied.
            self._fs.big_lock.acquire()
            conn.sendall(b'{"ok": true}\n')
            os._exit(0)
        else:
            reply = {"ok": False, "error": f"unknown op {op!r}"}
        conn.sendall(json.dumps(reply).encode() + b"\n")


def _watch_parent(pid: int, mountpoint: str, fs: LazyFilesystem) -> None:
    """A test run that died (timeout, kill -9) must not leave a live mount behind."""
    while True:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
    logger.warning("parent %d is gone: unmounting %s", pid, mountpoint)
    fs.big_lock.acquire()
    tool = shutil.which("fusermount3")
    cmd = [tool, "-uz", mountpoint] if tool else ["umount", "-l", mountpoint]
    subprocess.run(cmd, check=False, capture_output=True)
    os._exit(0)


def _serve(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="lazyfs", description="Mount a lazy (power-loss) FS.")
    parser.add_argument("serve", choices=["serve"])
    parser.add_argument("--backing", required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to pin the daemon to")
    parser.add_argument("--parent-pid", type=int, default=0, help="unmount and exit when it dies")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s lazyfs[%(process)d] %(levelname)s %(message)s",
    )
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    os.umask(0)
    # libfuse2 would be picked first if both are installed; the model needs libfuse3.
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except (ImportError, OSError) as exc:
        print(f"lazyfs: cannot load mfusepy/libfuse3: {exc}", file=sys.stderr, flush=True)
        return 3
    if mfusepy.fuse_version_major != 3:
        print("lazyfs: needs libfuse3, found libfuse2", file=sys.stderr, flush=True)
        return 3

    mounted = threading.Event()
    fs = LazyFilesystem(args.backing, context=lambda: mfusepy.fuse_get_context()[:2])
    plain_init = fs.init_with_config

    def init_with_config(conn: Any, config: Any) -> None:
        plain_init(conn, config)
        mounted.set()
        logger.info("mounted %s over %s", args.mountpoint, args.backing)

    fs.init_with_config = init_with_config  # type: ignore[method-assign]
    _ControlServer(args.control, fs, mounted).start()
    if args.parent_pid:
        threading.Thread(
            target=_watch_parent,
            args=(args.parent_pid, args.mountpoint, fs),
            name="lazyfs-watchdog",
            daemon=True,
        ).start()
    fuse_class = _make_fuse_class(mfusepy)
    fuse_class(
        fs,
        args.mountpoint,
        foreground=True,
        fsname=_FSNAME,
        subtype=_FSNAME,
        allow_other=True,
        default_permissions=True,
    )
    return 0


# --------------------------------------------------------------------------------------------
# The test-side handle.
# --------------------------------------------------------------------------------------------


def fuse_unavailable_reason() -> str | None:
    """Why a FUSE mount cannot work here, or None if it should."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel or container)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc}"
    import importlib.util

    if importlib.util.find_spec("mfusepy") is None:
        return "the Python package mfusepy is not installed (pip install mfusepy)"
    import ctypes.util

    if ctypes.util.find_library("fuse3") is None:
        return "libfuse3 is not installed (apt-get install fuse3 libfuse3-3)"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and fusermount3 is missing (apt-get install fuse3)"
    return None


def _mount_is_ours(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == mountpoint and fields[sep + 1] == f"fuse.{_FSNAME}":
                return True
    return False


class LazyFS:
    """Mount a lazy filesystem in its own process and control it: ``cut()``, ``unmount()``.

    ``backing_dir`` holds the durable state and must not be touched while mounted;
    ``mountpoint`` is a directory outside it (made if missing; what it holds is hidden while
    mounted). ``cpus`` pins the daemon (FIELD-NOTES: its speed varies tenfold on these
    2-core machines otherwise). The daemon unmounts and exits by itself if this process dies.
    """

    def __init__(
        self,
        backing_dir: str | os.PathLike[str],
        mountpoint: str | os.PathLike[str],
        *,
        startup_timeout_s: float = 20.0,
        cpus: Iterable[int] | None = None,
        debug: bool = False,
    ) -> None:
        self.backing_dir = Path(backing_dir).resolve()
        self.mountpoint = Path(mountpoint).resolve()
        if self.mountpoint == self.backing_dir or self.backing_dir in self.mountpoint.parents:
            raise LazyFSError(f"mountpoint {self.mountpoint} must not be inside the backing dir")
        self.startup_timeout_s = startup_timeout_s
        self.cpus = sorted(cpus) if cpus is not None else None
        self.debug = debug
        self.cuts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        # Control socket and daemon log: a short path (sun_path has 108 bytes), made on mount.
        self._workdir: Path | None = None

    def __enter__(self) -> Self:
        self.mount()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unmount()

    @property
    def mounted(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The daemon's log (all mounts of this LazyFS, cuts included), until unmount()."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="lazyfs-"))
        return self._workdir / "lazyfs.log"

    @property
    def _control_path(self) -> str:
        return str(self.log_path.parent / "control.sock")

    def log_tail(self) -> str:
        if self._workdir is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def _give_up(self, message: str) -> FuseUnavailable:
        """Tear down a failed mount attempt and say why, with the daemon's last words."""
        error = FuseUnavailable(f"{message}:\n{self.log_tail()}")
        self._kill_daemon()
        self._detach()
        self._remove_workdir()
        return error

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def mount(self) -> None:
        """Start the daemon and wait until the mount answers; FuseUnavailable if it cannot."""
        if self.mounted:
            raise LazyFSError("already mounted")
        reason = fuse_unavailable_reason()
        if reason is not None:
            raise FuseUnavailable(reason)
        self.backing_dir.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._detach()  # a dead mount left by a crashed run would hide ours
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._control_path)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "serve",
            "--backing",
            str(self.backing_dir),
            "--mountpoint",
            str(self.mountpoint),
            "--control",
            self._control_path,
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.cpus:
            cmd += ["--cpus", ",".join(map(str, self.cpus))]
        if self.debug:
            cmd.append("--debug")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise self._give_up(
                    f"lazyfs daemon exited with {rc} before mounting {self.mountpoint}"
                )
            with contextlib.suppress(OSError, ValueError, LazyFSError):
                if self._request("ping", timeout=1.0).get("mounted") and _mount_is_ours(
                    str(self.mountpoint)
                ):
                    return
            if time.monotonic() > deadline:
                self._proc.kill()
                raise self._give_up(
                    f"lazyfs did not mount {self.mountpoint} within {self.startup_timeout_s}s"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _request(self, op: str, *, timeout: float = _CONTROL_TIMEOUT_S, **kw: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self._control_path)
            sock.sendall(json.dumps({"op": op, **kw}).encode() + b"\n")
            line = sock.makefile("rb").readline()
        if not line:
            raise LazyFSError(f"lazyfs control: no answer to {op!r}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise LazyFSError(f"lazyfs control {op!r} failed: {reply.get('error')}")
        return reply

    def _require_mounted(self) -> None:
        if not self.mounted:
            raise LazyFSError(f"lazyfs is not mounted on {self.mountpoint}\n{self.log_tail()}")

    def stats(self) -> dict[str, Any]:
        """Sync counters and how much is still only in memory (for drill logs)."""
        self._require_mounted()
        stats: dict[str, Any] = self._request("stats")["stats"]
        return stats

    def sync(self) -> None:
        """Make everything durable now, as a clean shutdown of a real machine would."""
        self._require_mounted()
        self._request("sync_all")

    def power_off(self, after_syncs: int = 0) -> None:
        """From ``after_syncs`` more sync calls on, fail every operation with EIO.

        Nothing becomes durable after that point, so a drill can stop the durable state at
        an exact sync call, then kill the processes and ``cut()`` at leisure.
        """
        self._require_mounted()
        self._request("power_off", after_syncs=after_syncs)

    def cut(self) -> None:
        """Simulated power loss: drop everything not durable and remount the durable state.

        Processes with files still open on the mount get ENOTCONN from then on; kill them
        first (``kill_holders()``) to model the machine going down with them.
        """
        self._require_mounted()
        with contextlib.suppress(OSError, LazyFSError):
            self._request("cut", timeout=10.0)
        self._kill_daemon()
        self._detach()
        self.cuts += 1
        self.mount()

    def unmount(self, *, flush: bool = False) -> None:
        """Stop the filesystem. Without ``flush`` what was not durable is lost, as on a cut."""
        if self.mounted:
            if flush:
                self._request("sync_all")
            with contextlib.suppress(OSError, LazyFSError):
                self._request("cut", timeout=10.0)
        self._kill_daemon()
        self._detach()
        shutil.rmtree(self.backing_dir / STAGING_NAME, ignore_errors=True)
        self._remove_workdir()

    def _kill_daemon(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10.0)

    def _detach(self) -> None:
        """Lazily unmount whatever lazyfs mount is on the mountpoint (dead or alive)."""
        mountpoint = str(self.mountpoint)
        tool = shutil.which("fusermount3")
        cmd = [tool, "-uz", mountpoint] if tool else ["umount", "-l", mountpoint]
        for _ in range(10):  # stacked mounts from earlier crashed runs come off one by one
            if not _mount_is_ours(mountpoint):
                return
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0 and _mount_is_ours(mountpoint):
                raise LazyFSError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
        raise LazyFSError(f"{mountpoint} is still mounted after 10 lazy unmounts")

    def holders(self) -> list[int]:
        """PIDs (other than ours) with a file, cwd, root or mapping inside the mount."""
        prefix = str(self.mountpoint)
        daemon_pid = self._proc.pid if self._proc is not None else -1
        found: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in (os.getpid(), daemon_pid):
                continue
            if self._pid_uses(int(entry), prefix):
                found.append(int(entry))
        return found

    @staticmethod
    def _pid_uses(pid: int, prefix: str) -> bool:
        def inside(path: str) -> bool:
            return path == prefix or path.startswith(prefix + "/")

        base = f"/proc/{pid}"
        try:
            links = [os.path.join(base, "cwd"), os.path.join(base, "root")]
            links += [os.path.join(base, "fd", fd) for fd in os.listdir(os.path.join(base, "fd"))]
            for link in links:
                with contextlib.suppress(OSError):
                    if inside(os.readlink(link)):
                        return True
            with open(os.path.join(base, "maps"), encoding="utf-8", errors="replace") as maps:
                return any(inside(line.split(maxsplit=5)[-1].strip()) for line in maps)
        except OSError:
            return False

    def kill_holders(self, sig: int = signal.SIGKILL, *, timeout_s: float = 10.0) -> list[int]:
        """Send ``sig`` to every process using the mount and wait until they are gone."""
        pids = self.holders()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while any(os.path.exists(f"/proc/{pid}") and not _is_zombie(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise LazyFSError(f"processes {pids} still alive after {sig}")
            time.sleep(_POLL_INTERVAL_S)
        return pids


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
