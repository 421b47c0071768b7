"""Durable payload files: the spool and the quarantine.

Every file is written to a temporary name in the same file system, fsynced, renamed into
place and its directory fsynced, so after a crash a file either exists whole under its final
name or not at all; temporaries are removed at start. The state database decides what a file
means; ``recover()`` re-indexes files whose C-STORE was never answered.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import struct
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from telerad.core.fileio import ensure_dir, safe_name, write_atomic

logger = logging.getLogger(__name__)


def dataset_sha256(data: bytes) -> str:
    """sha256 of a Part-10 file's dataset, after the file meta.

    Identity of an instance's *content*: the file meta differs with the receiver (pynetdicom
    writes its own implementation UID), the dataset is what the modality sent. Our spool
    files always start with the (0002,0000) group length element, as pydicom writes it.
    """
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return hashlib.sha256(data).hexdigest()
    group_len = struct.unpack_from("<I", data, 128 + 4 + 8)[0]
    return hashlib.sha256(memoryview(data)[128 + 4 + 12 + group_len :]).hexdigest()


class Spool:
    """Layout under the gateway's data dir: ``spool/<study>/<sop>.dcm``, ``quarantine/``,
    ``outbox/`` (bundles being uploaded) and ``tmp/`` (write-in-progress files)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.spool_dir = data_dir / "spool"
        self.quarantine_dir = data_dir / "quarantine"
        self.outbox_dir = data_dir / "outbox"
        self.tmp_dir = data_dir / "tmp"
        self._study_dirs: set[Path] = set()
        for d in (self.spool_dir, self.quarantine_dir, self.outbox_dir, self.tmp_dir):
            ensure_dir(d)

    def instance_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        return self.spool_dir / safe_name(study_uid) / f"{safe_name(sop_instance_uid)}.dcm"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def store(
        self, study_uid: str, sop_instance_uid: str, data: bytes | Sequence[bytes | memoryview]
    ) -> Path:
        dst = self.instance_path(study_uid, sop_instance_uid)
        if dst.parent in self._study_dirs:
            try:
                write_atomic(dst, data, self.tmp_dir, parent_exists=True)
                return dst
            except FileNotFoundError:  # the folder was removed by hand: create it again
                self._study_dirs.discard(dst.parent)
        write_atomic(dst, data, self.tmp_dir)
        self._study_dirs.add(dst.parent)
        return dst

    def quarantine(self, data: bytes, reason: str) -> Path:
        """Keep what could not be processed, for a person to look at; never silently dropped."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        slug = re.sub(r"[^a-z0-9]+", "-", reason.lower())[:40].strip("-")
        dst = self.quarantine_dir / f"{stamp}-{slug}-{uuid.uuid4().hex[:8]}.dcm"
        write_atomic(dst, data, self.tmp_dir)
        return dst

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def clean_temporaries(self) -> int:
        """Remove write-in-progress files left by a crash: they were never acknowledged."""
        removed = 0
        for tmp in self.tmp_dir.iterdir():
            tmp.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.warning("removed %d partial files left by an interrupted run", removed)
        return removed

    def spooled_files(self) -> list[Path]:
        return sorted(self.spool_dir.glob("*/*.dcm"))
