"""The hub's receiving side: station tokens, manifests, resumable bundle uploads and commits.

A study reaches the reading queue only through ``commit``: the gateway announces what it has
(``announce`` answers what is missing), uploads bundles (tus; ``append`` keeps every byte that
arrived, so a broken connection resumes where it stopped), and when the study is complete
asks the hub to commit. The commit is one database transaction that checks the hub holds every
listed instance, marks them committed and appends a ``study_received`` event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from reading_queue import QueueError
from reading_queue.intake import index
from reading_queue.intake.archive import Archive, ArchiveError, open_archive
from reading_queue.models import (
    DicomSource,
    HubConflict,
    HubInstance,
    HubStudy,
    Station,
    StudyEvent,
    Upload,
    hash_token,
    make_engine,
)
from reading_queue.settings import HubSettings
from telerad.core.fileio import ensure_dir, fsync_dir, write_atomic
from telerad.core.identity import (
    IdentityError,
    UndecodableError,
    identity_of,
    read_header,
    uid_problem,
)
from telerad.core.wire import WireFormatError, read_bundle

logger = logging.getLogger(__name__)

_IN_CHUNK = 500  # stay far below SQLite's bound-parameter limit


class UnknownUpload(QueueError):
    pass


class OffsetMismatch(QueueError):
    def __init__(self, expected: int) -> None:
        super().__init__(f"upload offset is {expected}")
        self.expected = expected


class UploadBusy(QueueError):
    pass


class UploadClosed(QueueError):
    """A PATCH at the right offset for an upload that is already processed (or failed): a
    retry of a request whose answer was lost. Nothing to append; report the final state."""

    def __init__(self, upload: Upload) -> None:
        super().__init__(f"upload {upload.id} is {upload.state}")
        self.upload = upload


class BundleRejected(QueueError):
    """The bundle's content failed verification; the sender must re-pack it."""


class NotYourStudy(QueueError):
    """The study was started by another station: uploads, commits and priority changes for
    it are accepted only from that one (its name decides jurisdiction and SLA)."""

    def __init__(self, study_uid: str) -> None:
        super().__init__(
            f"study {study_uid} was started by another station; only that station may send, "
            "commit or re-prioritise it"
        )


class InstanceRefused(QueueError):
    """One instance cannot be held, whoever sends it again: different content under a held
    SOP Instance UID, or a header the hub cannot file. Not worth retrying."""


@dataclass(frozen=True)
class ManifestEntry:
    sop_instance_uid: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StudyMeta:
    priority: int = 2
    modality: str = ""
    body_part: str = ""
    #: How long ago the sender received the study's first instance, by its own clock: the
    #: hub dates that receipt by its clock minus this age (a station's clock may be off by
    #: hours; an age only carries the link's latency).
    received_age_s: float | None = None


@dataclass
class CommitResult:
    committed: bool
    instance_count: int = 0
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StudyCommitted:
    """The "study received" event the reading queue consumes."""

    study_uid: str
    station: str
    priority: int
    instance_count: int
    commit_count: int


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i : i + _IN_CHUNK]


class InsufficientStorage(QueueError):
    """The hub keeps a free-space reserve: the upload waits (HTTP 507, the gateway backs
    off and resumes; every byte already received is kept)."""


#: Disk an upload of N wire bytes may need: the bundle itself plus its decoded instances in
#: the archive (wire bytes are ~0.3-0.5 of raw for CT and CR).
UPLOAD_DISK_FACTOR = 3


class IngestService:
    def __init__(
        self, data_dir: Path, engine: Engine, archive: Archive, *, reserve_bytes: int = 0
    ) -> None:
        self.data_dir = data_dir
        self.reserve_bytes = reserve_bytes
        self.engine = engine
        self.archive = archive
        self.session: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
        self.uploads_dir = data_dir / "uploads"
        self.quarantine_dir = data_dir / "quarantine"
        self.tmp_dir = data_dir / "tmp"
        for d in (self.uploads_dir, self.quarantine_dir, self.tmp_dir):
            ensure_dir(d)
        self._upload_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._process_lock = threading.Lock()
        self.listeners: list[Callable[[StudyCommitted], None]] = []

    # -- disk ------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.uploads_dir).free

    def check_room(self, need: int) -> None:
        """InsufficientStorage unless ``need`` bytes fit above the reserve."""
        free = self.free_bytes()
        if free - need < self.reserve_bytes:
            raise InsufficientStorage(
                f"hub disk: {free // 2**20} MiB free, {need // 2**20} MiB needed above the "
                f"{self.reserve_bytes // 2**20} MiB reserve; retry later"
            )

    def disk_status(self) -> dict[str, Any]:
        """For /healthz: degraded below twice the reserve, before uploads are refused."""
        free = self.free_bytes()
        return {
            "free_bytes": free,
            "reserve_bytes": self.reserve_bytes,
            "state": "ok" if free >= 2 * self.reserve_bytes else "low",
        }

    # -- stations --------------------------------------------------------------------------

    def add_station(self, name: str) -> str:
        """Create a station and return its bearer token (shown once; only its hash is kept)."""
        token = secrets.token_urlsafe(32)
        with self.session.begin() as s:
            if s.scalar(select(Station).where(Station.name == name)) is not None:
                raise QueueError(f"station {name!r} already exists")
            s.add(Station(name=name, token_sha256=hash_token(token), created_at=time.time()))
        return token

    def rotate_token(self, name: str) -> str:
        token = secrets.token_urlsafe(32)
        with self.session.begin() as s:
            station = s.scalar(select(Station).where(Station.name == name))
            if station is None:
                raise QueueError(f"no station {name!r}")
            station.token_sha256 = hash_token(token)
        return token

    def list_stations(self) -> list[Station]:
        with self.session() as s:
            return list(s.scalars(select(Station).order_by(Station.name)))

    def authenticate(self, token: str) -> str | None:
        with self.session() as s:
            station = s.scalar(
                select(Station).where(
                    Station.token_sha256 == hash_token(token), Station.active.is_(True)
                )
            )
            return station.name if station else None

    # -- DICOM sources (the hub's own DICOM port) -------------------------------------------

    def add_source(self, aet: str, station: str, host: str = "") -> None:
        """Admit ``aet`` (from ``host``, or any address when empty) on the hub's DICOM port;
        its studies belong to ``station``."""
        aet, host = aet.strip(), host.strip()
        if not 0 < len(aet) <= 16:
            raise QueueError("AE titles are 1 to 16 characters")
        with self.session.begin() as s:
            self._station_id(s, station)
            row = s.scalar(
                select(DicomSource).where(DicomSource.aet == aet, DicomSource.host == host)
            )
            if row is not None:
                row.station = station
                return
            s.add(DicomSource(aet=aet, host=host, station=station, created_at=time.time()))

    def remove_source(self, aet: str, host: str = "") -> None:
        with self.session.begin() as s:
            row = s.scalar(
                select(DicomSource).where(
                    DicomSource.aet == aet.strip(), DicomSource.host == host.strip()
                )
            )
            if row is None:
                raise QueueError(f"no DICOM source {aet}{'@' + host if host else ''}")
            s.delete(row)

    def list_sources(self) -> list[DicomSource]:
        with self.session() as s:
            return list(s.scalars(select(DicomSource).order_by(DicomSource.aet)))

    def source_station(self, aet: str, host: str | None = None) -> str | None:
        """The station of a registered caller; ``host`` None matches any registration of
        the AE title (the address was checked at association)."""
        with self.session() as s:
            rows = list(s.scalars(select(DicomSource).where(DicomSource.aet == aet.strip())))
        for row in sorted(rows, key=lambda r: r.host == ""):  # an exact host first
            if host is None or not row.host or row.host == host:
                return row.station
        return None

    def _station_id(self, s: Session, name: str) -> int:
        sid = s.scalar(select(Station.id).where(Station.name == name))
        if sid is None:
            raise QueueError(f"no station {name!r}")
        return sid

    # -- manifest --------------------------------------------------------------------------

    def announce(
        self, station: str, study_uid: str, meta: StudyMeta, entries: Sequence[ManifestEntry]
    ) -> list[str]:
        """Register the study and answer which instances the hub still lacks (dedupe)."""
        uids = [e.sop_instance_uid for e in entries]
        held: dict[str, str] = {}
        with self.session.begin() as s:
            self._touch_study(s, station, study_uid, meta)
            for chunk in _chunks(uids):
                rows = s.execute(
                    select(HubInstance.sop_instance_uid, HubInstance.sha256).where(
                        HubInstance.sop_instance_uid.in_(chunk)
                    )
                )
                held.update({r[0]: r[1] for r in rows})
        # Same UID with other content is sent anyway: the hub quarantines it on arrival, so
        # the conflict is recorded where a person will see it, never silently dropped.
        return [e.sop_instance_uid for e in entries if held.get(e.sop_instance_uid) != e.sha256]

    @staticmethod
    def _check_owner(s: Session, station: str, study_uid: str) -> None:
        owner = s.scalar(select(HubStudy.station).where(HubStudy.study_uid == study_uid))
        if owner is not None and owner != station:
            raise NotYourStudy(study_uid)

    def _touch_study(self, s: Session, station: str, study_uid: str, meta: StudyMeta) -> HubStudy:
        """The study's row, created for ``station`` on first contact: its station is set
        once, and only that station changes it afterwards (NotYourStudy otherwise)."""
        study = s.get(HubStudy, study_uid)
        if study is not None and study.station != station:
            raise NotYourStudy(study_uid)
        if study is None:
            study = HubStudy(
                study_uid=study_uid,
                station=station,
                modality=meta.modality,
                body_part=meta.body_part,
                priority=meta.priority,
                state="receiving",
                instance_count=0,
                bytes=0,
                first_received=time.time(),
                commit_count=0,
            )
            s.add(study)
        else:
            study.priority = meta.priority
            study.modality = study.modality or meta.modality
            study.body_part = study.body_part or meta.body_part
        if meta.received_age_s is not None and study.station_received_at is None:
            study.station_received_at = min(time.time() - meta.received_age_s, study.first_received)
        return study

    # -- tus uploads -----------------------------------------------------------------------

    def create_upload(
        self, station: str, study_uid: str, bundle_sha256: str, length: int
    ) -> Upload:
        """Idempotent per (station, bundle): a gateway that lost the upload URL in a crash
        gets the same upload back and resumes it instead of sending it again."""
        now = time.time()
        with self.session.begin() as s:
            sid = self._station_id(s, station)
            self._check_owner(s, station, study_uid)
            self.check_room(UPLOAD_DISK_FACTOR * length)
            existing = s.scalar(
                select(Upload).where(
                    Upload.station_id == sid, Upload.bundle_sha256 == bundle_sha256
                )
            )
            if existing is not None and existing.state not in ("failed", "expired"):
                return existing
            if existing is not None:
                s.delete(existing)
                s.flush()
            upload = Upload(
                id=uuid.uuid4().hex,
                station_id=sid,
                study_uid=study_uid,
                bundle_sha256=bundle_sha256,
                length=length,
                offset=0,
                state="receiving",
                error="",
                created_at=now,
                updated_at=now,
            )
            s.add(upload)
        self._path(upload.id).touch()
        return upload

    def get_upload(self, station: str, upload_id: str) -> Upload:
        with self.session() as s:
            upload = s.get(Upload, upload_id)
            if upload is None or upload.station_id != self._station_id(s, station):
                raise UnknownUpload(upload_id)
            return upload

    def recover(self) -> None:
        """At hub start only (never from a CLI command beside a running hub): remove what a
        crash left half-written, and files of uploads already unpacked."""
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        clean = getattr(self.archive, "clean_temporaries", None)
        if clean is not None:
            clean()
        self._remove_finished_upload_files()

    def expire_uploads(self, max_age_s: float, now: float | None = None) -> int:
        """Give up uploads nobody resumed for ``max_age_s`` (a station re-installed, a bundle
        re-packed elsewhere): their partial bytes would otherwise stay on disk for ever. A
        gateway that comes back gets 410 and uploads the bundle again."""
        cutoff = (time.time() if now is None else now) - max_age_s
        with self.session.begin() as s:
            stale = list(
                s.scalars(
                    select(Upload).where(Upload.state == "receiving", Upload.updated_at < cutoff)
                )
            )
            for upload in stale:
                upload.state = "expired"
        for upload in stale:
            self._path(upload.id).unlink(missing_ok=True)
        if stale:
            logger.warning("expired %d uploads idle for more than %.0f s", len(stale), max_age_s)
        return len(stale)

    def _remove_finished_upload_files(self) -> None:
        """Remove upload files the hub no longer needs: a crash between unpacking a bundle and
        deleting its file leaves one behind. Safe beside a running hub: a processed or failed
        upload's file is never read again, and a receiving upload's file is kept."""
        files = {p.stem: p for p in self.uploads_dir.glob("*.bundle")}
        if not files:
            return
        with self.session() as s:
            open_ids = set(s.scalars(select(Upload.id).where(Upload.state == "receiving")))
        stale = [p for uid, p in files.items() if uid not in open_ids]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            logger.warning("removed %d upload files of finished uploads", len(stale))

    def _path(self, upload_id: str) -> Path:
        return self.uploads_dir / f"{upload_id}.bundle"

    def _lock(self, upload_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._upload_locks.setdefault(upload_id, threading.Lock())

    def begin_append(self, station: str, upload_id: str, offset: int) -> tuple[int, Upload]:
        """Validate a PATCH and return an fd positioned at ``offset``; the caller writes the
        body to it and must call ``end_append`` whatever happens."""
        upload = self.get_upload(station, upload_id)
        lock = self._lock(upload_id)
        if not lock.acquire(timeout=10):
            raise UploadBusy(upload_id)
        try:
            upload = self.get_upload(station, upload_id)
            if offset != upload.offset:
                raise OffsetMismatch(upload.offset)
            if upload.state != "receiving":
                # Never re-create the file of a finished upload: it was unpacked and removed
                # (ftruncate would leave a file of zeros behind for good).
                raise UploadClosed(upload)
            fd = os.open(self._path(upload_id), os.O_WRONLY | os.O_CREAT, 0o640)
            # Bytes past the recorded offset were never confirmed: drop them.
            os.ftruncate(fd, upload.offset)
            os.lseek(fd, upload.offset, os.SEEK_SET)
        except BaseException:
            lock.release()
            raise
        return fd, upload

    def end_append(self, upload_id: str, fd: int, written: int) -> int:
        """Make the received bytes durable, record the new offset, release the upload."""
        try:
            os.fsync(fd)
            os.close(fd)
            with self.session.begin() as s:
                upload = s.get(Upload, upload_id)
                assert upload is not None
                upload.offset = upload.offset + written
                upload.updated_at = time.time()
                return upload.offset
        finally:
            self._lock(upload_id).release()

    def process_if_complete(self, station: str, upload_id: str) -> Upload:
        """Unpack a fully received bundle into the archive (idempotent)."""
        upload = self.get_upload(station, upload_id)
        if upload.state != "receiving" or upload.offset != upload.length:
            return upload
        with self._lock(upload_id), self._process_lock:
            upload = self.get_upload(station, upload_id)
            if upload.state != "receiving":
                return upload
            try:
                self._unpack(station, upload)
            except (WireFormatError, BundleRejected) as exc:
                with self.session.begin() as s:
                    row = s.get(Upload, upload_id)
                    assert row is not None
                    row.state, row.error = "failed", str(exc)[:2000]
                self._path(upload_id).unlink(missing_ok=True)
                raise BundleRejected(str(exc)) from exc
            self._path(upload_id).unlink(missing_ok=True)
            return self.get_upload(station, upload_id)

    def _unpack(self, station: str, upload: Upload) -> None:
        path = self._path(upload.id)
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != upload.bundle_sha256:
            raise BundleRejected(f"bundle {upload.id} does not match its announced sha256")
        stored: list[HubInstance] = []
        indexed: list[index.IndexEntry] = []
        conflicts: list[HubConflict] = []
        now = time.time()
        with path.open("rb") as fh:
            for entry, data in read_bundle(fh):
                try:
                    header = read_header(data, decode=False)
                    ident = identity_of(header)
                except (IdentityError, UndecodableError) as exc:
                    raise BundleRejected(
                        f"bundle entry {entry.sop_instance_uid}: unusable header: {exc}"
                    ) from exc
                series_uid, sop_class = ident.series_uid, ident.sop_class_uid
                study_uid = ident.study_uid
                if (
                    ident.sop_instance_uid != entry.sop_instance_uid
                    or study_uid != upload.study_uid
                ):
                    raise BundleRejected(
                        f"bundle entry {entry.sop_instance_uid} does not match its header"
                    )
                with self.session() as s:
                    have = s.get(HubInstance, entry.sop_instance_uid)
                if have is not None:
                    if have.sha256 != entry.sha256:
                        qpath = self.quarantine_dir / f"{uuid.uuid4().hex}.dcm"
                        write_atomic(qpath, data, self.tmp_dir)
                        conflicts.append(
                            HubConflict(
                                sop_instance_uid=entry.sop_instance_uid,
                                study_uid=study_uid,
                                station=station,
                                sha256=entry.sha256,
                                path=str(qpath),
                                created_at=now,
                            )
                        )
                        logger.warning(
                            "conflicting content for %s from station %s quarantined",
                            entry.sop_instance_uid,
                            station,
                        )
                    continue
                ref = self.archive.store(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_instance_uid=entry.sop_instance_uid,
                    data=data,
                )
                stored.append(
                    HubInstance(
                        sop_instance_uid=entry.sop_instance_uid,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_class_uid=sop_class,
                        sha256=entry.sha256,
                        size=entry.size,
                        station=station,
                        archive_ref=ref,
                        state="received",
                        received_at=now,
                    )
                )
                indexed.append(index.entry_of(header, ident))
        with self.session.begin() as s:
            study = self._touch_study(s, station, upload.study_uid, StudyMeta())
            for inst in stored:
                s.merge(inst)
            index.record(s, indexed)
            study.bytes = (study.bytes or 0) + sum(i.size for i in stored)
            s.add_all(conflicts)
            row = s.get(Upload, upload.id)
            assert row is not None
            row.state = "processed"
            row.updated_at = now
        logger.info(
            "upload %s from %s: %d instances held for study %s",
            upload.id,
            station,
            len(stored),
            upload.study_uid,
        )

    # -- direct store (the hub's own DICOM listener) ---------------------------------------

    def store_instance(self, station: str, data: bytes) -> str:
        """Hold one instance that arrived at the hub directly (not through a bundle)."""
        sha = hashlib.sha256(data).hexdigest()
        try:
            header = read_header(data, decode=False)
            ident = identity_of(header)
        except (IdentityError, UndecodableError) as exc:
            raise InstanceRefused(f"unusable header: {exc}") from exc
        sop_uid, study_uid = ident.sop_instance_uid, ident.study_uid
        with self.session() as s:
            have = s.get(HubInstance, sop_uid)
        if have is not None:
            if have.sha256 == sha:
                return sop_uid
            raise InstanceRefused(f"different content already held for {sop_uid}")
        with self.session() as s:
            try:
                self._check_owner(s, station, study_uid)
            except NotYourStudy as exc:
                raise InstanceRefused(str(exc)) from exc
        ref = self.archive.store(
            study_uid=study_uid,
            series_uid=ident.series_uid,
            sop_instance_uid=sop_uid,
            data=data,
        )
        with self.session.begin() as s:
            study = self._touch_study(
                s,
                station,
                study_uid,
                StudyMeta(modality=ident.modality, body_part=ident.body_part),
            )
            study.bytes = (study.bytes or 0) + len(data)
            s.merge(
                HubInstance(
                    sop_instance_uid=sop_uid,
                    study_uid=study_uid,
                    series_uid=ident.series_uid,
                    sop_class_uid=ident.sop_class_uid,
                    sha256=sha,
                    size=len(data),
                    station=station,
                    archive_ref=ref,
                    state="received",
                    received_at=time.time(),
                )
            )
            index.record(s, [index.entry_of(header, ident)])
        return sop_uid

    # -- commit ----------------------------------------------------------------------------

    def commit(
        self,
        station: str,
        study_uid: str,
        sop_uids: Sequence[str],
        meta: StudyMeta,
        failed: Sequence[tuple[str, str]] = (),
    ) -> CommitResult:
        """Commit the listed instances. ``failed`` names instances the sender could not
        forward for good, with why: the study is committed, marked incomplete."""
        now = time.time()
        with self.session.begin() as s:
            self._check_owner(s, station, study_uid)
            held: set[str] = set()
            for chunk in _chunks(list(sop_uids)):
                held.update(
                    s.scalars(
                        select(HubInstance.sop_instance_uid).where(
                            HubInstance.sop_instance_uid.in_(chunk),
                            HubInstance.study_uid == study_uid,
                        )
                    )
                )
            # Content the hub kept aside (a conflicting re-use of a held SOP Instance UID in an
            # upload) is not in the study either: counted, so the worklist says so.
            conflicted = set(
                s.scalars(
                    select(HubConflict.sop_instance_uid).where(
                        HubConflict.study_uid == study_uid, HubConflict.station == station
                    )
                )
            )
            # A conflicting instance will never be held for this study: not "missing" (that
            # would have the gateway send it again for ever), counted as not delivered.
            missing = sorted(set(sop_uids) - held - conflicted)
            if missing:
                return CommitResult(False, missing=missing)
            newly = 0
            for chunk in _chunks(list(sop_uids)):
                res = s.execute(
                    update(HubInstance)
                    .where(
                        HubInstance.sop_instance_uid.in_(chunk),
                        HubInstance.study_uid == study_uid,
                        HubInstance.state == "received",
                    )
                    .values(state="committed", committed_at=now)
                )
                newly += int(getattr(res, "rowcount", 0) or 0)
            index.refresh_studies(s, [study_uid])
            study = self._touch_study(s, station, study_uid, meta)
            total = int(
                s.scalar(
                    select(func.count())
                    .select_from(HubInstance)
                    .where(HubInstance.study_uid == study_uid, HubInstance.state == "committed")
                )
                or 0
            )
            reasons = {why for _, why in failed}
            if conflicted:
                reasons.add(
                    f"{len(conflicted)} with content conflicting with what the hub holds "
                    "(telerad hub conflicts)"
                )
            missing_now = len({uid for uid, _ in failed} - held) + len(conflicted)
            if missing_now != (study.missing_instances or 0):
                study.missing_instances = missing_now
                study.missing_reason = "; ".join(sorted(reasons))[:500]
                if missing_now:
                    logger.warning(
                        "study %s from %s is incomplete: %d instances could not be delivered",
                        study_uid,
                        station,
                        missing_now,
                    )
            elif newly == 0 and study.state == "committed":
                return CommitResult(True, instance_count=total)  # idempotent re-commit
            study.state = "committed"
            study.committed_at = now
            study.commit_count = (study.commit_count or 0) + 1
            study.instance_count = total
            payload: dict[str, Any] = {
                "station": station,
                "priority": study.priority,
                "instance_count": total,
                "new_instances": newly,
                "commit_count": study.commit_count,
                "missing_instances": study.missing_instances or 0,
            }
            s.add(
                StudyEvent(
                    study_uid=study_uid,
                    kind="study_received",
                    payload=json.dumps(payload),
                    created_at=now,
                )
            )
            event = StudyCommitted(study_uid, station, study.priority, total, study.commit_count)
        logger.info(
            "study %s from %s committed: %d instances (%d new, commit #%d)",
            study_uid,
            station,
            total,
            newly,
            event.commit_count,
        )
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("study_received listener failed for %s", study_uid)
        return CommitResult(True, instance_count=total)

    # -- queries ---------------------------------------------------------------------------

    def studies(self) -> list[HubStudy]:
        with self.session() as s:
            return list(s.scalars(select(HubStudy).order_by(HubStudy.first_received)))

    def study_instances(self, study_uid: str, *, committed_only: bool = True) -> list[HubInstance]:
        with self.session() as s:
            q = select(HubInstance).where(HubInstance.study_uid == study_uid)
            if committed_only:
                q = q.where(HubInstance.state == "committed")
            return list(s.scalars(q.order_by(HubInstance.series_uid, HubInstance.received_at)))

    def conflicts(self) -> list[HubConflict]:
        with self.session() as s:
            return list(s.scalars(select(HubConflict).order_by(HubConflict.id)))

    def first_header(self, study_uid: str) -> Dataset | None:
        """One instance's header: accession, patient identity (for priors), description."""
        for inst in self.study_instances(study_uid)[:1]:
            try:
                data = self.archive.retrieve(inst.archive_ref)
            except ArchiveError:
                logger.warning("no header for study %s: archive unavailable", study_uid)
                return None
            try:
                return read_header(data, decode=False)
            except UndecodableError as exc:
                logger.warning("no header for study %s: %s", study_uid, exc)
                return None
        return None

    def export(
        self,
        study_uid: str,
        out_dir: Path,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Write a committed study's files back out (``<out>/<study>/<series>/<sop>.dcm``).

        Only inside ``out_dir``, whatever the UIDs say: a name that is not a usable UID
        (telerad.core.identity) is replaced by ``uid-<sha256 prefix>``. ``progress`` is
        called with the number of instances written so far."""
        count = 0
        root = out_dir.resolve()
        tmp = root / ".tmp"
        ensure_dir(tmp)
        for inst in self.study_instances(study_uid):
            try:
                data = self.archive.retrieve(inst.archive_ref)
            except ArchiveError as exc:
                raise QueueError(f"cannot export {inst.sop_instance_uid}: {exc}") from exc
            dst = root / export_name(study_uid) / export_name(inst.series_uid)
            dst = dst / f"{export_name(inst.sop_instance_uid)}.dcm"
            if not dst.resolve().is_relative_to(root):  # defence in depth; names are safe
                raise QueueError(f"refusing to write outside {root}: {dst}")
            write_atomic(dst, data, tmp)
            count += 1
            if progress is not None:
                progress(count)
        tmp.rmdir()
        fsync_dir(root)
        return count


def export_name(uid: str) -> str:
    """A UID as a file or folder name: itself when it is a usable UID (digits and dots, so
    never ``..`` or a separator), else a stable name derived from its hash."""
    if uid_problem(uid) is None and uid not in (".", ".."):
        return uid
    return "uid-" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def open_ingest(settings: HubSettings) -> IngestService:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url())
    return IngestService(
        settings.data_dir,
        engine,
        open_archive(settings),
        reserve_bytes=settings.disk_reserve_mb * 1024 * 1024,
    )
