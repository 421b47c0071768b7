"""Station upload protocol: manifest, tus 1.0.0 resumable bundle uploads, commit.

tus core + creation + termination (https://tus.io/protocols/resumable-upload). One upload
carries one bundle (many instances, losslessly compressed for the wire). Extension headers:
``Telerad-Upload-State`` on HEAD/PATCH tells whether the hub has unpacked the bundle.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from pydantic import AfterValidator, BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from reading_queue.intake.archive import ArchiveError
from reading_queue.intake.service import (
    UPLOAD_DISK_FACTOR,
    BundleRejected,
    InsufficientStorage,
    ManifestEntry,
    NotYourStudy,
    OffsetMismatch,
    StudyMeta,
    UnknownUpload,
    UploadBusy,
    UploadClosed,
)
from telerad.core.identity import safe_uid, uid_problem
from viewer_api.deps import IngestDep, StationDep

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/ingest", tags=["ingest"])

TUS_VERSION = "1.0.0"
MAX_BUNDLE = 4 * 1024**3
_WRITE_BLOCK = 1 << 20


#: A UID by telerad.core.identity's rule (the gateway refuses the same at receive time).
Uid = Annotated[str, AfterValidator(safe_uid)]
StudyUid = Annotated[str, Path(max_length=64), AfterValidator(safe_uid)]


class InstanceIn(BaseModel):
    sop_instance_uid: Uid
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class StudyHeader(BaseModel):
    priority: int = Field(default=2, ge=0, le=2)
    modality: str = ""
    body_part: str = ""
    #: seconds since the station received the study's first instance (its journey's start)
    received_age_s: float | None = Field(default=None, ge=0, le=366 * 86400)


class ManifestIn(StudyHeader):
    instances: list[InstanceIn]


class ManifestOut(BaseModel):
    missing: list[str]


class FailedIn(BaseModel):
    #: Not validated as a UID: an instance the gateway refused may have a broken one.
    sop_instance_uid: str = Field(max_length=200)
    reason: str = Field(default="", max_length=500)


class CommitIn(StudyHeader):
    sop_instance_uids: list[Uid]
    #: Instances the station could not deliver for good: the study is marked incomplete.
    failed: list[FailedIn] = Field(default_factory=list, max_length=100_000)


class CommitOut(BaseModel):
    committed: bool
    instance_count: int
    missing: list[str]


class _DiskFull(Exception):
    def __init__(self, written: int, error: OSError) -> None:
        self.written = written
        self.error = error


def _write_all(fd: int, data: bytearray) -> int:
    """Write all of ``data`` (``os.write`` may write less); _DiskFull says how much was
    written when the disk filled up, so the recorded offset stays exact."""
    done = 0
    with memoryview(data) as view:  # released before the caller clears ``data``
        while done < len(view):
            try:
                with view[done:] as rest:
                    n = os.write(fd, rest)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _DiskFull(done, exc) from None
                raise
            if n <= 0:
                raise _DiskFull(done, OSError(errno.ENOSPC, "write made no progress"))
            done += n
    return done


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


@contextmanager
def _own_study() -> Iterator[None]:
    """A study another station started answers 403 with the reason; the gateway counts it
    as a refusal of that study (needs attention), never as a link failure."""
    try:
        yield
    except NotYourStudy as exc:
        raise HTTPException(403, str(exc)) from None


def _tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


def _check_tus(request: Request) -> None:
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise HTTPException(
            status.HTTP_412_PRECONDITION_FAILED,
            f"Tus-Resumable: {TUS_VERSION} required",
            headers={"Tus-Version": TUS_VERSION},
        )


def _metadata(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, value = pair.partition(" ")
        try:
            out[key] = base64.b64decode(value).decode() if value else ""
        except ValueError:
            raise HTTPException(400, f"Upload-Metadata {key!r} is not base64") from None
    return out


@router.post("/studies/{study_uid}/manifest", response_model=ManifestOut)
def announce(
    study_uid: StudyUid, body: ManifestIn, station: StationDep, ingest: IngestDep
) -> ManifestOut:
    with _own_study():
        missing = ingest.announce(
            station,
            study_uid,
            StudyMeta(body.priority, body.modality, body.body_part, body.received_age_s),
            [ManifestEntry(i.sop_instance_uid, i.size, i.sha256) for i in body.instances],
        )
    return ManifestOut(missing=missing)


@router.post("/studies/{study_uid}/commit", response_model=CommitOut)
def commit(
    study_uid: StudyUid, body: CommitIn, station: StationDep, ingest: IngestDep
) -> CommitOut:
    with _own_study():
        res = ingest.commit(
            station,
            study_uid,
            body.sop_instance_uids,
            StudyMeta(body.priority, body.modality, body.body_part, body.received_age_s),
            [(f.sop_instance_uid, f.reason) for f in body.failed],
        )
    return CommitOut(
        committed=res.committed, instance_count=res.instance_count, missing=res.missing
    )


@router.options("/uploads")
def tus_options() -> Response:
    return Response(
        status_code=204,
        headers=_tus_headers(
            **{
                "Tus-Version": TUS_VERSION,
                "Tus-Extension": "creation",
                "Tus-Max-Size": str(MAX_BUNDLE),
            }
        ),
    )


@router.post("/uploads", status_code=201)
def create_upload(request: Request, station: StationDep, ingest: IngestDep) -> Response:
    _check_tus(request)
    try:
        length = int(request.headers["upload-length"])
    except (KeyError, ValueError):
        raise HTTPException(400, "Upload-Length header required") from None
    if not 0 < length <= MAX_BUNDLE:
        raise HTTPException(413, f"Upload-Length must be 1..{MAX_BUNDLE}")
    meta = _metadata(request.headers.get("upload-metadata", ""))
    study_uid, bundle_sha = meta.get("study_uid", ""), meta.get("bundle_sha256", "")
    if not study_uid or len(bundle_sha) != 64:
        raise HTTPException(400, "Upload-Metadata needs study_uid and bundle_sha256")
    if uid_problem(study_uid) is not None:
        raise HTTPException(400, f"study_uid is not a usable UID ({uid_problem(study_uid)})")
    try:
        with _own_study():
            upload = ingest.create_upload(station, study_uid, bundle_sha, length)
    except InsufficientStorage as exc:
        raise HTTPException(507, str(exc), headers=_tus_headers()) from None
    if upload.length != length:
        raise HTTPException(409, "a bundle with this sha256 exists with another length")
    return Response(
        status_code=201,
        headers=_tus_headers(
            Location=f"{request.url.path}/{upload.id}",
            **{"Upload-Offset": str(upload.offset), "Telerad-Upload-State": upload.state},
        ),
    )


@router.head("/uploads/{upload_id}")
def head_upload(
    upload_id: str, request: Request, station: StationDep, ingest: IngestDep
) -> Response:
    _check_tus(request)
    try:
        upload = ingest.get_upload(station, upload_id)
    except UnknownUpload:
        raise HTTPException(404, "no such upload") from None
    if upload.state == "expired":
        raise HTTPException(410, "upload expired; create it again", headers=_tus_headers())
    return Response(
        status_code=200,
        headers=_tus_headers(
            **{
                "Upload-Offset": str(upload.offset),
                "Upload-Length": str(upload.length),
                "Telerad-Upload-State": upload.state,
            }
        ),
    )


@router.patch("/uploads/{upload_id}")
async def patch_upload(
    upload_id: str, request: Request, station: StationDep, ingest: IngestDep
) -> Response:
    _check_tus(request)
    if request.headers.get("content-type") != "application/offset+octet-stream":
        raise HTTPException(415, "Content-Type must be application/offset+octet-stream")
    try:
        offset = int(request.headers["upload-offset"])
    except (KeyError, ValueError):
        raise HTTPException(400, "Upload-Offset header required") from None
    try:
        fd, upload = await run_in_threadpool(ingest.begin_append, station, upload_id, offset)
    except UnknownUpload:
        raise HTTPException(404, "no such upload") from None
    except OffsetMismatch as exc:
        raise HTTPException(409, str(exc), headers=_tus_headers()) from None
    except UploadBusy:
        raise HTTPException(423, "upload busy; retry", headers=_tus_headers()) from None
    except UploadClosed as exc:
        # A retried request whose answer was lost: the upload is complete, say so.
        done = exc.upload
        return Response(
            status_code=204,
            headers=_tus_headers(
                **{"Upload-Offset": str(done.offset), "Telerad-Upload-State": done.state}
            ),
        )
    room = upload.length - upload.offset
    written = 0
    too_long = False
    no_space = ""
    buf = bytearray()
    try:
        try:
            ingest.check_room(UPLOAD_DISK_FACTOR * room)
        except InsufficientStorage as exc:
            no_space = str(exc)
        try:
            async for piece in request.stream() if not no_space else _nothing():
                if written + len(buf) + len(piece) > room:
                    too_long = True
                    break
                buf += piece
                if len(buf) >= _WRITE_BLOCK:
                    written += _write_all(fd, buf)
                    buf.clear()
        except ClientDisconnect:
            # Keep what arrived: the gateway resumes from here after HEAD.
            logger.info("upload %s from %s interrupted; keeping received bytes", upload_id, station)
        except _DiskFull as exc:
            written += exc.written
            buf.clear()
            no_space = f"hub disk full after {written} bytes of this request: {exc.error}"
        if buf:
            try:
                written += _write_all(fd, buf)
            except _DiskFull as exc:
                written += exc.written
                no_space = f"hub disk full after {written} bytes of this request: {exc.error}"
    finally:
        new_offset = await run_in_threadpool(ingest.end_append, upload_id, fd, written)
    if no_space:
        logger.warning("upload %s from %s waits for disk: %s", upload_id, station, no_space)
        raise HTTPException(
            507,
            no_space,
            headers=_tus_headers(**{"Upload-Offset": str(new_offset)}),
        )
    if too_long:
        raise HTTPException(413, "body runs past Upload-Length", headers=_tus_headers())
    state = upload.state
    if new_offset == upload.length:
        try:
            done = await run_in_threadpool(ingest.process_if_complete, station, upload_id)
            state = done.state
        except BundleRejected as exc:
            raise HTTPException(460, f"bundle rejected: {exc}", headers=_tus_headers()) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Bytes are kept; an empty PATCH re-runs the unpacking once there is room.
            logger.error("upload %s: no disk to unpack: %s", upload_id, exc)
            raise HTTPException(
                507, f"hub disk full while unpacking: {exc}", headers=_tus_headers()
            ) from None
        except ArchiveError as exc:
            # Bytes are kept; the gateway retries and an empty PATCH re-runs the unpacking.
            logger.error("upload %s: archive unavailable: %s", upload_id, exc)
            raise HTTPException(
                503, f"archive unavailable: {exc}", headers=_tus_headers()
            ) from None
    return Response(
        status_code=204,
        headers=_tus_headers(**{"Upload-Offset": str(new_offset), "Telerad-Upload-State": state}),
    )
