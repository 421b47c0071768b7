"""Archive back-ends where the hub keeps DICOM instances, chosen by configuration.

Registered by type like pydicom's pixel back-ends: each declares whether it can run here and
says what is missing when it cannot. ``filesystem`` is the embedded default; ``orthanc`` is a
real Orthanc server reached over its REST API.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx

from reading_queue import QueueError
from reading_queue.settings import HubSettings
from telerad.core.fileio import ensure_dir, safe_name, write_atomic

logger = logging.getLogger(__name__)


class ArchiveError(QueueError):
    """The archive could not store or return an instance (retryable by the sender)."""


class Archive(Protocol):
    """Stores whole Part-10 files; ``ref`` is the back-end's own handle for an instance."""

    name: str

    def store(
        self, *, study_uid: str, series_uid: str, sop_instance_uid: str, data: bytes
    ) -> str: ...

    def retrieve(self, ref: str) -> bytes: ...

    def check(self) -> None:
        """Raise ArchiveError with a reason when the archive cannot be used."""


class FilesystemArchive:
    """``<root>/<study>/<series>/<sop>.dcm``, written atomically (temp, fsync, rename)."""

    name = "filesystem"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        ensure_dir(self.tmp)

    def clean_temporaries(self) -> int:
        """Only when the hub starts: a CLI command opening the archive beside a running hub
        must not delete the files it is writing."""
        removed = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def store(self, *, study_uid: str, series_uid: str, sop_instance_uid: str, data: bytes) -> str:
        rel = (
            Path(safe_name(study_uid))
            / safe_name(series_uid)
            / f"{safe_name(sop_instance_uid)}.dcm"
        )
        try:
            write_atomic(self.root / rel, data, self.tmp)
        except OSError as exc:
            raise ArchiveError(f"filesystem archive: {exc}") from exc
        return str(rel)

    def retrieve(self, ref: str) -> bytes:
        path = (self.root / ref).resolve()
        if self.root.resolve() not in path.parents:
            raise ArchiveError(f"reference outside the archive: {ref}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ArchiveError(f"filesystem archive: {exc}") from exc

    def check(self) -> None:
        if not self.root.is_dir():
            raise ArchiveError(f"archive directory {self.root} does not exist")


class OrthancArchive:
    """A real Orthanc over REST (``orthanc-api-client``); ``ref`` is Orthanc's instance id."""

    name = "orthanc"

    def __init__(self, url: str, user: str | None = None, password: str | None = None) -> None:
        try:
            from orthanc_api_client import OrthancApiClient
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ArchiveError(
                "the orthanc archive needs the 'orthanc-api-client' package"
            ) from exc
        self.url = url
        self._user, self._password = user, password or ""
        self._client = OrthancApiClient(url, user=user, pwd=password)

    def store(self, *, study_uid: str, series_uid: str, sop_instance_uid: str, data: bytes) -> str:
        try:
            ids = self._client.upload(data)
        except Exception as exc:
            raise ArchiveError(f"orthanc upload failed: {exc}") from exc
        if not ids:
            raise ArchiveError("orthanc accepted the upload but returned no instance id")
        return str(ids[0])

    def retrieve(self, ref: str) -> bytes:
        try:
            return bytes(self._client.instances.get_file(ref))
        except Exception as exc:
            raise ArchiveError(f"orthanc download of {ref} failed: {exc}") from exc

    def check(self) -> None:
        """Distinguish "down" from "wrong credentials": the fixes differ."""
        auth = (self._user, self._password) if self._user else None
        try:
            resp = httpx.get(f"{self.url.rstrip('/')}/system", auth=auth, timeout=5)
        except httpx.HTTPError as exc:
            raise ArchiveError(f"orthanc at {self.url} is not answering: {exc}") from exc
        if resp.status_code in (401, 403):
            raise ArchiveError(
                f"orthanc at {self.url} rejected our credentials ({resp.status_code})"
            )
        if resp.status_code != 200:
            raise ArchiveError(f"orthanc at {self.url} answered HTTP {resp.status_code}")


_BACKENDS: dict[str, Callable[[HubSettings], Archive]] = {
    "filesystem": lambda s: FilesystemArchive(s.data_dir / "archive"),
    "orthanc": lambda s: OrthancArchive(s.orthanc_url, s.orthanc_user, s.orthanc_password),
}


def open_archive(settings: HubSettings) -> Archive:
    try:
        factory = _BACKENDS[settings.archive]
    except KeyError:
        raise ArchiveError(
            f"unknown archive {settings.archive!r}; choose one of {sorted(_BACKENDS)}"
        ) from None
    return factory(settings)
