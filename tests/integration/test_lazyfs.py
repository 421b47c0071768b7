"""The lazy (power-loss) filesystem: what survives a cut, through a real FUSE mount.

Two layers:

* ``TestModel`` drives ``LazyFilesystem`` directly (no FUSE, always runs): a seeded random
  sequence of creates, writes, renames, links, mkdir/rmdir, fsyncs and cuts is replayed
  against a small reference model of the durability rules, and after every step the
  backing directory must equal the reference's durable tree and the mount's view its
  volatile tree.
* The other tests mount it (``lazy`` fixture) and check the rules the drills rely on, with
  real syscalls and SQLite in WAL mode. Without FUSE they are skipped, loudly; with
  ``TELERAD_REQUIRE_PEERS=1`` they fail instead.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.lazyfs import (
    STAGING_NAME,
    FuseUnavailable,
    LazyFilesystem,
    LazyFS,
    fuse_unavailable_reason,
)
from tests.support.peers import require_peer

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[LazyFS]:
    """A mounted lazy filesystem over ``tmp_path/backing`` at ``tmp_path/mnt``.

    Tests using it are marked ``needs_fuse`` (checked before setup); a mount that still fails
    (e.g. no CAP_SYS_ADMIN in a container) goes through the same skip-or-fail policy.
    """
    fs = LazyFS(tmp_path / "backing", tmp_path / "mnt")
    try:
        fs.mount()
    except FuseUnavailable as exc:
        require_peer("FUSE", False, f"lazyfs power-loss tests cannot mount: {exc}")
    try:
        yield fs
    finally:
        fs.unmount()


def _write(path: Path, data: bytes, *, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Through the mount: the durability rules
# --------------------------------------------------------------------------------------------


@pytest.mark.needs_fuse
def test_unsynced_write_is_visible_then_gone_after_cut(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    _write(mnt / "a.dcm", b"payload" * 1000, fsync=False)
    assert (mnt / "a.dcm").read_bytes() == b"payload" * 1000
    assert os.listdir(lazy.backing_dir) == [STAGING_NAME]  # nothing durable yet
    lazy.cut()
    assert os.listdir(mnt) == []


@pytest.mark.needs_fuse
def test_fsynced_file_without_dir_fsync_is_gone(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    _write(mnt / "a.dcm", b"x" * 5000, fsync=True)
    lazy.cut()
    assert not (mnt / "a.dcm").exists()


@pytest.mark.needs_fuse
def test_file_and_dir_fsync_survive(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    (mnt / "spool").mkdir()
    _fsync_dir(mnt)
    _write(mnt / "spool" / "a.dcm", b"study" * 2000, fsync=True)
    _fsync_dir(mnt / "spool")
    lazy.cut()
    assert (mnt / "spool" / "a.dcm").read_bytes() == b"study" * 2000
    # The backing directory is the durable state, readable without FUSE.
    assert (lazy.backing_dir / "spool" / "a.dcm").read_bytes() == b"study" * 2000


@pytest.mark.needs_fuse
def test_dir_fsync_without_file_fsync_leaves_an_empty_file(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    _write(mnt / "a.dcm", b"never synced", fsync=False)
    _fsync_dir(mnt)
    lazy.cut()
    assert (mnt / "a.dcm").read_bytes() == b""


@pytest.mark.needs_fuse
def test_new_directory_needs_its_parent_fsynced(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    (mnt / "incoming").mkdir()
    _write(mnt / "incoming" / "a.dcm", b"x", fsync=True)
    _fsync_dir(mnt / "incoming")  # its entries are durable, but it has no durable name
    lazy.cut()
    assert os.listdir(mnt) == []


@pytest.mark.needs_fuse
def test_atomic_replace_survives(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    _write(mnt / "state.json", b"old", fsync=True)
    _fsync_dir(mnt)
    _write(mnt / "state.json.tmp", b"new", fsync=True)
    os.replace(mnt / "state.json.tmp", mnt / "state.json")
    _fsync_dir(mnt)
    lazy.cut()
    assert sorted(os.listdir(mnt)) == ["state.json"]
    assert (mnt / "state.json").read_bytes() == b"new"


@pytest.mark.needs_fuse
def test_rename_without_dir_fsync_is_undone(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    _write(mnt / "state.json", b"old", fsync=True)
    _write(mnt / "state.json.tmp", b"new", fsync=True)
    _fsync_dir(mnt)
    os.replace(mnt / "state.json.tmp", mnt / "state.json")
    assert (mnt / "state.json").read_bytes() == b"new"
    lazy.cut()
    assert sorted(os.listdir(mnt)) == ["state.json", "state.json.tmp"]
    assert (mnt / "state.json").read_bytes() == b"old"
    assert (mnt / "state.json.tmp").read_bytes() == b"new"


@pytest.mark.needs_fuse
def test_cross_directory_rename_commits_per_directory(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    for name in ("tmp", "done"):
        (mnt / name).mkdir()
    _fsync_dir(mnt)
    _write(mnt / "tmp" / "a", b"A", fsync=True)
    _write(mnt / "tmp" / "b", b"B", fsync=True)
    _fsync_dir(mnt / "tmp")
    os.rename(mnt / "tmp" / "a", mnt / "done" / "a")
    os.rename(mnt / "tmp" / "b", mnt / "done" / "b")
    _fsync_dir(mnt / "done")  # only the destination: both names exist after a cut
    lazy.cut()
    assert sorted(os.listdir(mnt / "tmp")) == ["a", "b"]
    assert sorted(os.listdir(mnt / "done")) == ["a", "b"]
    assert (mnt / "done" / "a").read_bytes() == b"A"
    os.rename(mnt / "done" / "a", mnt / "tmp" / "moved")
    _fsync_dir(mnt / "done")  # only the source: the file is lost
    lazy.cut()
    assert sorted(os.listdir(mnt / "done")) == ["b"]
    assert sorted(os.listdir(mnt / "tmp")) == ["a", "b"]


@pytest.mark.needs_fuse
def test_unlink_without_dir_fsync_comes_back(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    _write(mnt / "a.dcm", b"keep me", fsync=True)
    _fsync_dir(mnt)
    os.unlink(mnt / "a.dcm")
    assert not (mnt / "a.dcm").exists()
    lazy.cut()
    assert (mnt / "a.dcm").read_bytes() == b"keep me"
    os.unlink(mnt / "a.dcm")
    _fsync_dir(mnt)
    lazy.cut()
    assert not (mnt / "a.dcm").exists()


@pytest.mark.needs_fuse
def test_overwrite_without_fsync_reverts_to_durable_content(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    _write(mnt / "f", b"0123456789", fsync=True)
    _fsync_dir(mnt)
    with open(mnt / "f", "r+b") as f:
        f.seek(3)
        f.write(b"abc")
        f.truncate(8)
    assert (mnt / "f").read_bytes() == b"012abc67"
    lazy.cut()
    assert (mnt / "f").read_bytes() == b"0123456789"


@pytest.mark.needs_fuse
def test_posix_semantics_through_the_mount(lazy: LazyFS) -> None:
    """What an application does between syncs behaves as on any filesystem."""
    mnt = lazy.mountpoint
    with open(mnt / "f", "w+b") as f:
        f.write(b"hello world")
        f.seek(0)
        assert f.read() == b"hello world"
        os.pwrite(f.fileno(), b"HELLO", 0)
        os.ftruncate(f.fileno(), 20)
        assert os.pread(f.fileno(), 100, 0) == b"HELLO world" + bytes(9)
        os.posix_fallocate(f.fileno(), 0, 4096)
        assert os.fstat(f.fileno()).st_size == 4096
        os.fsync(f.fileno())
    with open(mnt / "f", "ab") as f:
        f.write(b"!")
    assert os.path.getsize(mnt / "f") == 4097
    os.link(mnt / "f", mnt / "g")
    assert os.stat(mnt / "f").st_nlink == 2
    assert os.stat(mnt / "f").st_ino == os.stat(mnt / "g").st_ino
    os.symlink("f", mnt / "s")
    assert os.readlink(mnt / "s") == "f"
    assert (mnt / "s").read_bytes()[:5] == b"HELLO"
    os.chmod(mnt / "f", 0o600)
    assert os.stat(mnt / "g").st_mode & 0o777 == 0o600
    (mnt / "d" / "e").mkdir(parents=True)
    with pytest.raises(OSError):
        (mnt / "d").rmdir()
    os.rename(mnt / "d", mnt / "d2")
    assert sorted(os.listdir(mnt)) == ["d2", "f", "g", "s"]
    # An unlinked file stays readable and writable through its open descriptor.
    fd = os.open(mnt / "g", os.O_RDWR)
    os.unlink(mnt / "g")
    os.pwrite(fd, b"J", 0)
    assert os.pread(fd, 5, 0) == b"JELLO"
    os.close(fd)
    sv, backing = os.statvfs(mnt), os.statvfs(lazy.backing_dir)
    assert (sv.f_blocks, sv.f_bsize) == (backing.f_blocks, backing.f_bsize)
    # Shared writable mmap (SQLite's -shm) works: direct_io is off.
    with open(mnt / "m", "w+b") as f:
        f.truncate(8192)
        with mmap.mmap(f.fileno(), 8192) as m:
            m[100:105] = b"shm!!"
            m.flush()
    assert (mnt / "m").read_bytes()[100:105] == b"shm!!"
    assert not any(name == STAGING_NAME for name in os.listdir(mnt))


@pytest.mark.needs_fuse
def test_open_files_fail_after_a_cut(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    _write(mnt / "f", b"data", fsync=True)
    _fsync_dir(mnt)
    fd = os.open(mnt / "f", os.O_RDONLY)
    lazy.cut()
    with pytest.raises(OSError) as raised:
        os.pread(fd, 4, 0)
    assert raised.value.errno == errno.ENOTCONN
    with pytest.raises(OSError):
        os.close(fd)  # even close fails (its flush): the old mount is dead
    assert (mnt / "f").read_bytes() == b"data"  # the new mount serves the durable state


@pytest.mark.needs_fuse
def test_power_off_stops_the_durable_state_at_a_sync_call(lazy: LazyFS) -> None:
    """Crash at the Nth sync: each file takes 2 syncs (file, then dir), so N=5 keeps 2."""
    mnt = lazy.mountpoint
    lazy.power_off(after_syncs=5)
    stored = 0
    with pytest.raises(OSError):
        for i in range(10):
            _write(mnt / f"{i}.tmp", b"x" * 1000, fsync=True)
            os.rename(mnt / f"{i}.tmp", mnt / f"{i}.dcm")
            _fsync_dir(mnt)
            stored += 1
    assert stored == 2
    assert lazy.stats()["powered_off"]
    lazy.cut()
    # Sync 5 made 2.tmp's data durable, but no directory fsync ever gave it a name.
    assert sorted(os.listdir(mnt)) == ["0.dcm", "1.dcm"]


# --------------------------------------------------------------------------------------------
# SQLite in WAL mode, as the gateway uses it
# --------------------------------------------------------------------------------------------

_SQLITE_WRITER = textwrap.dedent(
    """
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=" + sys.argv[2])
    db.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(10):
        db.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for _ in range(10):
        db.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    print(db.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
    time.sleep(120)  # hold the database open, as a running gateway does, until killed
    """
)


def _sqlite_drill(lazy: LazyFS, synchronous: str) -> int:
    """Commit 10 rows, checkpoint, commit 10 more, kill -9 the writer, cut; rows left."""
    db_path = lazy.mountpoint / "state.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _SQLITE_WRITER, str(db_path), synchronous],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "20"  # all committed, as the writer sees it
        assert writer.pid in lazy.kill_holders()
    finally:
        writer.kill()
        writer.wait()
    lazy.cut()
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows: int = db.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        db.close()
    return rows


@pytest.mark.needs_fuse
def test_sqlite_wal_synchronous_full_keeps_every_commit(lazy: LazyFS) -> None:
    assert _sqlite_drill(lazy, "FULL") == 20


@pytest.mark.needs_fuse
def test_sqlite_wal_synchronous_normal_loses_commits_since_checkpoint(lazy: LazyFS) -> None:
    """The point of the drill: NORMAL is durable only up to the last checkpoint."""
    assert _sqlite_drill(lazy, "NORMAL") == 10


_SQLITE_CONCURRENT_WRITER = textwrap.dedent(
    """
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    db.execute("PRAGMA synchronous=FULL")
    for i in range(200):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (int(sys.argv[2]), i))
        db.execute("COMMIT")
        if i % 20 == 0:
            db.execute("SELECT count(*) FROM t").fetchone()
    db.close()
    """
)


@pytest.mark.needs_fuse
def test_sqlite_wal_shared_memory_across_processes(lazy: LazyFS) -> None:
    """Three processes share the WAL index (-shm, mmapped) through the mount."""
    db_path = lazy.mountpoint / "shared.db"
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t(writer INTEGER, i INTEGER)")
    db.close()
    writers = [
        subprocess.Popen([sys.executable, "-c", _SQLITE_CONCURRENT_WRITER, str(db_path), str(w)])
        for w in range(3)
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    for when in ("before", "after"):
        db = sqlite3.connect(db_path)
        try:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",), when
            assert db.execute("SELECT count(*) FROM t").fetchone() == (600,), when
        finally:
            db.close()
        if when == "before":
            lazy.cut()


# --------------------------------------------------------------------------------------------
# A gateway-sized load: hundreds of 100 KB-1 MB files, each stored atomically
# --------------------------------------------------------------------------------------------


@pytest.mark.needs_fuse
def test_gateway_sized_load_survives_a_cut(lazy: LazyFS) -> None:
    rng = random.Random(20261203)
    spool = lazy.mountpoint / "spool"
    spool.mkdir()
    _fsync_dir(lazy.mountpoint)
    sizes = [rng.randint(100_000, 1_000_000) for _ in range(200)]
    blob = rng.randbytes(max(sizes) + 256)
    started = time.monotonic()
    for i, size in enumerate(sizes):
        data = blob[i : i + size]
        _write(spool / f"{i}.tmp", data, fsync=True)
        os.replace(spool / f"{i}.tmp", spool / f"{i}.dcm")
        _fsync_dir(spool)
    elapsed = time.monotonic() - started
    _write(spool / "unsynced.dcm", b"lost", fsync=False)
    stats = lazy.stats()
    assert stats["sync_calls"] == 2 * len(sizes) + 1
    total_mb = sum(sizes) / 1e6
    print(f"lazyfs: {len(sizes)} files, {total_mb:.0f} MB stored atomically in {elapsed:.2f} s")
    lazy.cut()
    names = os.listdir(spool)
    assert sorted(names) == sorted(f"{i}.dcm" for i in range(len(sizes)))
    for i in rng.sample(range(len(sizes)), 20):
        assert (spool / f"{i}.dcm").read_bytes() == blob[i : i + sizes[i]]


@pytest.mark.needs_fuse
def test_sync_and_flushing_unmount_make_everything_durable(lazy: LazyFS) -> None:
    mnt = lazy.mountpoint
    (mnt / "d").mkdir()
    _write(mnt / "d" / "a", b"A", fsync=False)
    lazy.sync()
    lazy.cut()
    assert (mnt / "d" / "a").read_bytes() == b"A"
    _write(mnt / "d" / "b", b"B", fsync=False)
    lazy.unmount(flush=True)
    assert (lazy.backing_dir / "d" / "b").read_bytes() == b"B"
    assert not (lazy.backing_dir / STAGING_NAME).exists()
    lazy.mount()  # a LazyFS can be mounted again; the fixture unmounts it
    assert sorted(os.listdir(mnt / "d")) == ["a", "b"]


def test_fuse_unavailable_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p != "/dev/fuse" and real_exists(p))
    reason = fuse_unavailable_reason()
    assert reason is not None and "/dev/fuse" in reason
    with pytest.raises(FuseUnavailable, match="/dev/fuse"):
        LazyFS(tmp_path / "b", tmp_path / "m").mount()


# --------------------------------------------------------------------------------------------
# The model against a reference of the durability rules (no FUSE)
# --------------------------------------------------------------------------------------------


@dataclass
class _RefFile:
    data: bytes = b""
    durable: bytes = b""


@dataclass
class _RefDir:
    entries: dict[str, int] = field(default_factory=dict)
    durable: dict[str, int] = field(default_factory=dict)


class _Reference:
    """The rules of the module docstring, on plain dicts: per-object fsync, per-dir fsyncdir."""

    def __init__(self) -> None:
        self.objs: dict[int, _RefFile | _RefDir] = {0: _RefDir()}
        self._next = 1

    def dir(self, oid: int) -> _RefDir:
        obj = self.objs[oid]
        assert isinstance(obj, _RefDir)
        return obj

    def file(self, oid: int) -> _RefFile:
        obj = self.objs[oid]
        assert isinstance(obj, _RefFile)
        return obj

    def resolve(self, path: str) -> int:
        oid = 0
        for part in filter(None, path.split("/")):
            oid = self.dir(oid).entries[part]
        return oid

    def new(self, obj: _RefFile | _RefDir) -> int:
        self.objs[self._next] = obj
        self._next += 1
        return self._next - 1

    def fsyncdir(self, oid: int) -> None:
        d = self.dir(oid)
        for name, child in d.entries.items():
            if isinstance(self.objs[child], _RefDir) and d.durable.get(name) != child:
                for other_id, other in self.objs.items():  # one durable parent per directory
                    if isinstance(other, _RefDir) and other_id != oid:
                        other.durable = {n: c for n, c in other.durable.items() if c != child}
        d.durable = dict(d.entries)

    def cut(self) -> None:
        """Keep only what the durable tree reaches, as the durable version of itself."""
        kept: dict[int, _RefFile | _RefDir] = {}
        pending = [0]
        while pending:
            oid = pending.pop()
            if oid in kept:
                continue
            obj = self.objs[oid]
            if isinstance(obj, _RefDir):
                kept[oid] = _RefDir(dict(obj.durable), dict(obj.durable))
                pending.extend(obj.durable.values())
            else:
                kept[oid] = _RefFile(obj.durable, obj.durable)
        self.objs = kept

    def tree(self, *, durable: bool) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}

        def walk(oid: int, prefix: str) -> None:
            d = self.dir(oid)
            for name, child in (d.durable if durable else d.entries).items():
                obj = self.objs[child]
                if isinstance(obj, _RefDir):
                    out[prefix + name] = None
                    walk(child, prefix + name + "/")
                else:
                    out[prefix + name] = obj.durable if durable else obj.data

        walk(0, "/")
        return out


def _backing_tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root).removeprefix(".").lstrip("/")
        prefix = rel.rstrip("/") + "/"
        if rel == "/":
            dirnames[:] = [d for d in dirnames if d != STAGING_NAME]
        for d in dirnames:
            out[prefix + d] = None
        for f in filenames:
            out[prefix + f] = (Path(dirpath) / f).read_bytes()
    return out


def _mounted_tree(fs: LazyFilesystem) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}

    def walk(path: str) -> None:
        fh = fs.opendir(path)
        names = [name for name, _, _ in fs.readdir(path, fh) if name not in (".", "..")]
        fs.releasedir(path, fh)
        for name in names:
            child = path.rstrip("/") + "/" + name
            if fs.getattr(child)["st_mode"] & 0o170000 == 0o040000:
                out[child] = None
                walk(child)
            else:
                fh = fs.open(child, os.O_RDONLY)
                out[child] = fs.read(child, 1 << 20, 0, fh)
                fs.release(child, fh)

    walk("/")
    return out


class TestModel:
    """Random operation sequences: model and reference agree after every step."""

    NAMES = ("a", "b", "c", "d")
    # Weighted by repetition: syncs and creates often, cuts now and then.
    OPS = (
        *("create", "create", "write", "truncate", "fsync", "fsync"),
        *("fsyncdir", "fsyncdir", "fsyncdir", "unlink", "rename", "link"),
        *("mkdir", "rmdir", "rename_dir", "unlinked_fsync", "cut"),
    )

    def _step(
        self, rng: random.Random, fs: LazyFilesystem, ref: _Reference, backing: Path
    ) -> tuple[LazyFilesystem, str]:
        volatile = ref.tree(durable=False)
        files = [p for p, v in volatile.items() if v is not None]
        dirs = ["/", *(p for p, v in volatile.items() if v is None)]
        op = rng.choice(self.OPS)

        def child(d: str) -> str:
            return d.rstrip("/") + "/" + rng.choice(self.NAMES)

        def split(p: str) -> tuple[int, str]:
            head, _, name = p.rpartition("/")
            return ref.resolve(head or "/"), name

        if op == "create":
            path = child(rng.choice(dirs))
            if path in volatile:
                return fs, "skip"
            data = rng.randbytes(rng.randint(0, 50))
            fh = fs.create(path, 0o644, os.O_WRONLY)
            fs.write(path, data, 0, fh)
            fs.release(path, fh)
            pid, name = split(path)
            ref.dir(pid).entries[name] = ref.new(_RefFile(data, b""))
        elif op in ("write", "truncate", "fsync", "unlinked_fsync") and files:
            path = rng.choice(files)
            oid = ref.resolve(path)
            f = ref.file(oid)
            fh = fs.open(path, os.O_RDWR)
            if op == "unlinked_fsync":
                pid, name = split(path)
                fs.unlink(path)
                del ref.dir(pid).entries[name]
                fs.write(None, b"Z", 0, fh)
                f.data = b"Z" + f.data[1:]
                fs.fsync(None, 0, fh)
                f.durable = f.data
            elif op == "write":
                offset = rng.randint(0, len(f.data) + 5)
                data = rng.randbytes(rng.randint(1, 20))
                fs.write(path, data, offset, fh)
                padded = f.data + bytes(max(0, offset - len(f.data)))
                f.data = padded[:offset] + data + padded[offset + len(data) :]
            elif op == "truncate":
                length = rng.randint(0, len(f.data) + 10)
                fs.truncate(path, length, fh)
                f.data = f.data[:length] + bytes(max(0, length - len(f.data)))
            else:
                fs.fsync(path, 0, fh)
                f.durable = f.data
            fs.release(path, fh)
        elif op == "fsyncdir":
            path = rng.choice(dirs)
            fh = fs.opendir(path)
            fs.fsyncdir(path, 0, fh)
            fs.releasedir(path, fh)
            ref.fsyncdir(ref.resolve(path))
        elif op == "unlink" and files:
            path = rng.choice(files)
            fs.unlink(path)
            pid, name = split(path)
            del ref.dir(pid).entries[name]
        elif op in ("rename", "link") and files:
            src = rng.choice(files)
            dst = child(rng.choice(dirs))
            if volatile.get(dst, b"") is None or (op == "link" and dst in volatile):
                return fs, "skip"
            spid, sname = split(src)
            dpid, dname = split(dst)
            oid = ref.dir(spid).entries[sname]
            if op == "rename" and ref.dir(dpid).entries.get(dname) == oid:
                fs.rename(src, dst)  # two names of one file: POSIX says nothing happens
            elif op == "rename":
                fs.rename(src, dst)
                del ref.dir(spid).entries[sname]
            else:
                fs.link(dst, src)
            ref.dir(dpid).entries[dname] = oid
        elif op == "mkdir":
            path = child(rng.choice(dirs))
            if path in volatile or path.count("/") > 4:
                return fs, "skip"
            fs.mkdir(path, 0o755)
            pid, name = split(path)
            ref.dir(pid).entries[name] = ref.new(_RefDir())
        elif op == "rmdir" and len(dirs) > 1:
            path = rng.choice(dirs[1:])
            if ref.dir(ref.resolve(path)).entries:
                return fs, "skip"
            fs.rmdir(path)
            pid, name = split(path)
            del ref.dir(pid).entries[name]
        elif op == "rename_dir" and len(dirs) > 1:
            # To the root or within its parent: a directory moved under one of its own
            # durable descendants is the documented limit of the model.
            src = rng.choice(dirs[1:])
            head = src.rpartition("/")[0] or "/"
            dst = child(rng.choice([head, "/"]))
            if dst in volatile or dst == src:
                return fs, "skip"
            fs.rename(src, dst)
            spid, sname = split(src)
            dpid, dname = split(dst)
            ref.dir(dpid).entries[dname] = ref.dir(spid).entries.pop(sname)
        elif op == "cut":
            ref.cut()
            return LazyFilesystem(backing), "cut"
        else:
            return fs, "skip"
        return fs, op

    @pytest.mark.parametrize("seed", range(12))
    def test_random_operations_match_reference(self, tmp_path: Path, seed: int) -> None:
        rng = random.Random(seed)
        backing = tmp_path / "backing"
        backing.mkdir()
        fs, ref = LazyFilesystem(backing), _Reference()
        history: list[str] = []
        for _ in range(300):
            fs, op = self._step(rng, fs, ref, backing)
            history.append(op)
            where = f"seed {seed} after {history[-8:]}"
            assert _backing_tree(backing) == ref.tree(durable=True), where
            assert _mounted_tree(fs) == ref.tree(durable=False), where
        # Nothing leaks: staging holds only objects still reachable through the mount.
        fs.sync_all()
        assert _backing_tree(backing) == ref.tree(durable=False)
        assert os.listdir(backing / STAGING_NAME) == []
        assert history.count("cut") > 3

    def test_staging_is_invisible_and_reserved(self, tmp_path: Path) -> None:
        fs = LazyFilesystem(tmp_path)
        assert [n for n, _, _ in fs.readdir("/", fs.opendir("/"))] == [".", ".."]
        with pytest.raises(PermissionError):
            fs.mkdir("/" + STAGING_NAME, 0o755)
        with pytest.raises(FileNotFoundError):
            fs.getattr("/" + STAGING_NAME)
