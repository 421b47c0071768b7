"""Crash-safe file writes shared by the gateway spool and the hub archive.

A file is written to a temporary name in the same file system, fsynced, renamed into place
and its directory fsynced: after a crash it exists whole under its final name or not at all.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

_SAFE_UID = re.compile(r"[0-9][0-9.]{0,63}")


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID; conformant UIDs are used as they are (readable)."""
    if _SAFE_UID.fullmatch(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create a directory durably: a new directory entry must survive a crash too."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def write_atomic(
    dst: Path,
    data: bytes | memoryview | Sequence[bytes | memoryview],
    tmp_dir: Path,
    *,
    parent_exists: bool = False,
) -> None:
    """Write ``data`` (one buffer, or several written in order without joining them) so that
    ``dst`` holds all of it or nothing, durably. ``parent_exists`` skips the directory check
    for callers that already know (the C-STORE hot path)."""
    if not parent_exists:
        ensure_dir(dst.parent)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        views = (
            [memoryview(data)]
            if isinstance(data, bytes | memoryview)
            else [memoryview(b) for b in data]
        )
        views = [v for v in views if len(v)]
        while views:
            written = os.writev(fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)
