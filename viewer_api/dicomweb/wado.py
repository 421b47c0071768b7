"""WADO-RS (PS3.18 §10.4): instances, metadata, frames and bulk data, as OHIF v3, Weasis and
dicomweb-client ask for them.

Routes (under ``/dicom-web``)::

    GET /studies/{s}                                     multipart/related; type=application/dicom
    GET /studies/{s}/series/{se}
    GET /studies/{s}/series/{se}/instances/{i}           (also single-part application/dicom)
    GET /studies/{s}/metadata                            application/dicom+json
    GET /studies/{s}/series/{se}/metadata
    GET /studies/{s}/series/{se}/instances/{i}/metadata
    GET /studies/{s}/series/{se}/instances/{i}/frames/{1,2,...}
    GET /studies/{s}/series/{se}/instances/{i}/bulk/{tag[/item/tag...]}

**Who may see what.** Every route signs the caller in (``UserDep``: 401 without a live
token) and asks ``reading_queue.access`` whether the study is theirs. A study that exists but
is not theirs gets byte for byte the answer of one that does not exist (404 ``study not
found``); a series or instance must belong to the study named in the path (else 404).

**Audit.** Every request is one event (``dicomweb.retrieve``, ``.metadata``, ``.frames``,
``.bulk``; EventID "DICOM Instances Accessed", action R) with the client's address; refusals
(404, 406, 400) are outcome 4 (minor failure). A refused study UID is always written into
``detail``; it goes into ``study_uid`` only when such a study exists (then the attempt is
part of that study's record, which is what a privacy review asks for: "who tried to open
this study"), never for a UID the hub does not know, so callers cannot fill the study
index with strings of their choosing.

**Caching.** ETags are strong and derived from the instances' sha256 (and the frame list,
media type and syntax chosen); multipart boundaries derive from the ETag, so the same
resource is always the same bytes. An instance's content never changes under its sha256:
instance-level answers are ``private, max-age=86400, immutable``. Study and series answers
change when instances arrive, so they are ``private, no-cache`` (revalidate: 304 if
unchanged). ``private`` always: patient data behind a sign-in never goes into a shared
cache. ``Range`` is honoured on single-part answers (an instance as ``application/dicom``,
bulk data as ``application/octet-stream``).

**Negotiation** is ``multipart.negotiate_*``: frames are never re-encoded into another
compressed syntax, only decoded to Explicit VR Little Endian when that is asked for (or
nothing is, PS3.18's default); instances go as stored unless a specific syntax is asked for,
and are then transcoded only losslessly (decompressed, or compressed with JPEG-LS, RLE or
JPEG 2000 lossless).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from starlette.datastructures import Headers

from reading_queue.accounts import Principal
from reading_queue.audit import INSTANCES_ACCESSED, AuditTrail, Outcome
from viewer_api import coding
from viewer_api.dicomweb import multipart as mp
from viewer_api.dicomweb.instances import (
    BASE_MARKER_JSON,
    BadFrame,
    InstanceError,
    InstanceInfo,
    InstanceRow,
    InstanceStore,
    NoPixelData,
    NoSuchBulkData,
    can_decode,
    can_transcode,
    transcode,
)
from viewer_api.routes.auth import UserDep

logger = logging.getLogger(__name__)

router = APIRouter()

#: One day: a browser keeps an instance's frames while a reader works through a list, and
#: forgets them by the next day (access is re-checked when it asks again).
MAX_AGE_S: Final = 86400
IMMUTABLE: Final = f"private, max-age={MAX_AGE_S}, immutable"
REVALIDATE: Final = "private, no-cache"
#: The one answer for a study that does not exist and one the caller may not see.
STUDY_NOT_FOUND: Final = "study not found"
SERIES_NOT_FOUND: Final = "series not found in this study"
INSTANCE_NOT_FOUND: Final = "instance not found in this series"
#: Most frames one request may name (OHIF asks for one at a time).
MAX_FRAMES_PER_REQUEST: Final = 10_000
#: Bumped when the JSON this module writes for the same instances changes.
METADATA_VERSION: Final = "1"
_PIXEL_TAGS: Final = frozenset({"7FE00010", "7FE00008", "7FE00009"})
#: Syntaxes whose pixel data gzip shrinks (Deflated is gzip's own algorithm already).
GZIPPED_SYNTAXES: Final = mp.NATIVE_SYNTAXES - {mp.DEFLATED}

_store_lock = threading.Lock()


# ---------------------------------------------------------------------------- plumbing


def store_for_app(app: Any) -> InstanceStore:
    """The app's instance store, made on first use (one per app: its cache is shared)."""
    state = app.state
    found: InstanceStore | None = getattr(state, "dicomweb_instances", None)
    if found is None:
        with _store_lock:
            found = getattr(state, "dicomweb_instances", None)
            if found is None:
                ingest = state.ingest
                found = InstanceStore(ingest.archive, ingest.engine)
                state.dicomweb_instances = found
    return found


def instance_store(request: Request) -> InstanceStore:
    return store_for_app(request.app)


def warm_headers_on_commit(app: Any) -> None:
    """Read every newly committed study's headers into the cache, on one background
    thread, so a reader's first look at a study (in teleradiology usually the only one)
    gets its metadata from memory. One thread in commit order: a burst of commits never
    competes with ingest for more than one core. Call once where the app is made."""
    store = store_for_app(app)
    pending: queue.SimpleQueue[str] = queue.SimpleQueue()

    def run() -> None:
        while True:
            uid = pending.get()
            try:
                store.warm(uid)
            except Exception:  # a cache warm-up is best effort; the request reads it later
                logger.exception("warming the headers of a study failed")

    threading.Thread(target=run, daemon=True, name="dicomweb-warm").start()
    app.state.ingest.listeners.append(lambda event: pending.put(str(event.study_uid)))


@dataclass(frozen=True)
class Call:
    """One DICOMweb request: who, from where, which event it is audited as."""

    request: Request
    user: Principal
    event: str

    @property
    def address(self) -> str:
        client = self.request.client
        return client.host if client else ""

    @property
    def audit(self) -> AuditTrail:
        trail: AuditTrail = self.request.app.state.audit
        return trail

    @property
    def store(self) -> InstanceStore:
        return instance_store(self.request)

    def ok(self, study_uid: str, detail: str) -> None:
        self.audit.record(
            self.user, "", self.event, INSTANCES_ACCESSED,
            study_uid=study_uid, address=self.address, detail=detail,
        )  # fmt: skip

    def fail(
        self,
        status: int,
        message: str,
        *,
        study_uid: str | None,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> NoReturn:
        """Audit a refusal (outcome 4) and answer it."""
        self.audit.record(
            self.user, "", self.event, INSTANCES_ACCESSED,
            study_uid=study_uid, address=self.address, outcome=Outcome.MINOR_FAILURE,
            detail=detail,
        )  # fmt: skip
        raise HTTPException(status, message, headers)

    def rows(
        self, study: str, series: str | None = None, sop: str | None = None
    ) -> list[InstanceRow]:
        """The committed instances named by the path, after the access rule; 404 (the same
        for "not yours" and "does not exist") otherwise."""
        access = self.request.app.state.access
        if not access.can_see(self.user, study):
            exists = self.store.registry.study_exists(study)
            why = "exists, not visible to the caller" if exists else "unknown to this hub"
            self.fail(
                404,
                STUDY_NOT_FOUND,
                study_uid=study if exists else None,
                detail=f"refused: study {study[:64]} {why}",
            )
        rows = self.store.registry.instances(study, series, sop)
        if not rows:
            if series is None:
                message, what = STUDY_NOT_FOUND, "no committed instances"
            elif sop is None or not self.store.registry.instances(study, series):
                message, what = SERIES_NOT_FOUND, f"no series {series[:64]}"
            else:
                message, what = INSTANCE_NOT_FOUND, f"no instance {sop[:64]} in that series"
            self.fail(404, message, study_uid=study, detail=f"refused: {what}")
        return rows

    def negotiation_failed(self, study: str, exc: Exception, what: str) -> NoReturn:
        self.fail(406, str(exc), study_uid=study, detail=f"not acceptable: {what}")

    def bad_request(self, study: str, message: str, what: str) -> NoReturn:
        self.fail(400, message, study_uid=study, detail=f"bad request: {what}: {message}"[:255])


def accept_ranges(call: Call, study: str, what: str) -> list[mp.MediaRange]:
    try:
        return mp.parse_accept(call.request.headers.get("accept"))
    except mp.AcceptError as exc:
        call.negotiation_failed(study, exc, f"{what}: unparseable Accept")


def make_etag(*parts: object) -> str:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return f'"{digest[:40]}"'


def rows_version(rows: Iterable[InstanceRow]) -> str:
    """Stands for the content of a set of instances: their UIDs and sha256s."""
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.sop_instance_uid):
        h.update(f"{row.sop_instance_uid}:{row.sha256};".encode())
    return h.hexdigest()


def not_modified(headers: Headers, etag: str) -> bool:
    """``If-None-Match`` names ``etag`` (weak comparison, RFC 9110 §13.1.2) or is ``*``."""
    given = headers.get("if-none-match")
    if not given:
        return False
    if given.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in given.split(","))


def cache_headers(etag: str, *, immutable: bool) -> dict[str, str]:
    return {
        "ETag": etag,
        "Cache-Control": IMMUTABLE if immutable else REVALIDATE,
        "Vary": "Accept",
    }


def answer_not_modified(headers: dict[str, str]) -> Response:
    return Response(status_code=304, headers=headers)


def parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """A single ``bytes=`` range as (first, last) inclusive; None: ignore the header (not
    bytes, several ranges, malformed: RFC 9110 lets a server send the whole body);
    False: unsatisfiable (416)."""
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first_text == "":
            suffix = int(last_text)
            if suffix <= 0:
                return False
            return (max(0, size - suffix), size - 1) if size else False
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
    except ValueError:
        return None
    if first < 0 or (last_text and last < first):
        return None
    if first >= size:
        return False
    return first, min(last, size - 1)


def single_part(
    request: Request, body: bytes, media_type: str, headers: dict[str, str]
) -> Response:
    """A one-part answer, honouring ``Range`` (and ``If-Range``) for 206/416."""
    headers = {**headers, "Accept-Ranges": "bytes"}
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted and (if_range is None or if_range.strip() == headers.get("ETag")):
        parsed = parse_range(wanted, len(body))
        if parsed is False:
            return Response(
                status_code=416, headers={**headers, "Content-Range": f"bytes */{len(body)}"}
            )
        if isinstance(parsed, tuple):
            first, last = parsed
            return Response(
                body[first : last + 1],
                status_code=206,
                media_type=media_type,
                headers={**headers, "Content-Range": f"bytes {first}-{last}/{len(body)}"},
            )
    return Response(body, media_type=media_type, headers=headers)


def multipart_response(
    boundary: str,
    part_type: str,
    parts: list[tuple[str, bytes]],
    headers: dict[str, str],
    gzip: bool = False,
) -> Response:
    body = coding.encode(b"".join(mp.write_multipart(boundary, parts)), headers, gzip)
    return Response(
        body, media_type=mp.multipart_content_type(part_type, boundary), headers=headers
    )


def dicomweb_base(request: Request) -> str:
    """This hub's DICOMweb root as the client reached it (``http://host/dicom-web``): what
    BulkDataURIs are built on."""
    url = str(request.url).split("?", 1)[0]
    return url.split("/studies/", 1)[0]


def info_or_fail(call: Call, study: str, row: InstanceRow) -> InstanceInfo:
    try:
        return call.store.info(row)
    except InstanceError as exc:
        logger.warning("instance %s unreadable: %s", row.sop_instance_uid, exc)
        call.fail(422, str(exc), study_uid=study, detail=f"unreadable {row.sop_instance_uid}"[:255])


# ---------------------------------------------------------------------------- retrieve


def _gzips(store: InstanceStore, first: InstanceRow, syntax: str | None) -> bool:
    """Whether instances served in ``syntax`` (None: as stored, judged by the first,
    since a modality sends a study in one syntax) are worth gzipping."""
    if syntax is None:
        try:
            syntax = store.syntax(first)
        except InstanceError:
            return False
    return syntax in GZIPPED_SYNTAXES


def _retrieve(call: Call, study: str, rows: list[InstanceRow], level: str, uid: str) -> Response:
    request, store = call.request, call.store
    ranges = accept_ranges(call, study, f"retrieve {level}")
    single = level == "instance"
    needs_syntaxes = any(r.transfer_syntax not in (None, "*") for r in ranges)
    stored = {store.syntax(row) for row in rows} if needs_syntaxes else set()
    try:
        choice = mp.negotiate_retrieve(ranges, stored, can_transcode=can_transcode, single=single)
    except mp.NotAcceptable as exc:
        call.negotiation_failed(study, exc, f"retrieve {level} {uid}")
    gzip = coding.wants_gzip(request.headers) and _gzips(store, rows[0], choice.transfer_syntax)
    etag = make_etag("retrieve", rows_version(rows), choice.transfer_syntax, choice.multipart, gzip)
    headers = coding.vary(cache_headers(etag, immutable=single))
    as_what = choice.transfer_syntax or "as stored"
    detail = f"retrieve {level} {uid} ({len(rows)} instances, {as_what})"
    if not_modified(request.headers, etag):
        call.ok(study, detail + " not modified")
        return answer_not_modified(headers)

    def body_of(row: InstanceRow) -> tuple[str, bytes]:
        data = store.read(row)
        if choice.transfer_syntax is None:
            return store.syntax(row, data), data
        return choice.transfer_syntax, transcode(data, choice.transfer_syntax)

    if single:
        try:
            syntax, data = body_of(rows[0])
        except InstanceError as exc:
            if choice.transfer_syntax is not None:
                call.negotiation_failed(study, exc, f"retrieve instance {uid}")
            call.fail(503, str(exc), study_uid=study, detail=f"unavailable: instance {uid}")
        call.ok(study, detail)
        part_ct = mp.content_type(mp.DICOM, syntax)
        if not choice.multipart:
            return single_part(request, coding.encode(data, headers, gzip), part_ct, headers)
        boundary = mp.boundary_for(etag)
        return multipart_response(boundary, mp.DICOM, [(part_ct, data)], headers, gzip)

    call.ok(study, detail)
    boundary = mp.boundary_for(etag)

    def stream() -> Iterator[bytes]:
        # One instance in memory at a time: a 60 MB study never becomes one bytes object.
        first = True
        for row in rows:
            try:
                syntax, data = body_of(row)
            except InstanceError:
                logger.exception("retrieve of %s stopped at %s", uid, row.sop_instance_uid)
                raise
            yield mp.part_header(boundary, mp.content_type(mp.DICOM, syntax), first=first)
            yield data
            first = False
        yield mp.closing(boundary, empty=first)

    if gzip:
        headers["Content-Encoding"] = "gzip"
    return StreamingResponse(
        coding.gzip_stream(stream()) if gzip else stream(),
        media_type=mp.multipart_content_type(mp.DICOM, boundary),
        headers=headers,
    )


@router.get("/studies/{study}")
def retrieve_study(request: Request, user: UserDep, study: str) -> Response:
    call = Call(request, user, "dicomweb.retrieve")
    rows = call.rows(study)
    return _retrieve(call, study, rows, "study", study)


@router.get("/studies/{study}/series/{series}")
def retrieve_series(request: Request, user: UserDep, study: str, series: str) -> Response:
    call = Call(request, user, "dicomweb.retrieve")
    rows = call.rows(study, series)
    return _retrieve(call, study, rows, "series", series)


@router.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(
    request: Request, user: UserDep, study: str, series: str, instance: str
) -> Response:
    call = Call(request, user, "dicomweb.retrieve")
    rows = call.rows(study, series, instance)
    return _retrieve(call, study, rows, "instance", instance)


# ---------------------------------------------------------------------------- metadata


def _metadata(call: Call, study: str, rows: list[InstanceRow], level: str, uid: str) -> Response:
    request = call.request
    ranges = accept_ranges(call, study, f"metadata {level}")
    try:
        media_type = mp.negotiate_metadata(ranges)
    except mp.NotAcceptable as exc:
        call.negotiation_failed(study, exc, f"metadata {level} {uid}")
    base = dicomweb_base(request)
    gzip = coding.wants_gzip(request.headers)
    etag = make_etag("metadata", METADATA_VERSION, base, media_type, rows_version(rows), gzip)
    headers = coding.vary(cache_headers(etag, immutable=level == "instance"))
    detail = f"metadata {level} {uid} ({len(rows)} instances)"
    if not_modified(request.headers, etag):
        call.ok(study, detail + " not modified")
        return answer_not_modified(headers)
    infos: list[InstanceInfo] = []
    unreadable = 0
    for row in rows:
        try:
            infos.append(call.store.info(row))
        except InstanceError as exc:
            # One broken file must not hide a whole series from the reader.
            logger.warning("metadata without %s: %s", row.sop_instance_uid, exc)
            unreadable += 1
    if not infos and unreadable:
        call.fail(422, "no instance here could be read", study_uid=study, detail=detail)
    call.ok(study, detail + (f", {unreadable} unreadable" if unreadable else ""))
    body = b"[" + b",".join(info.json for info in infos) + b"]"
    escaped_base = json.dumps(base, ensure_ascii=False)[1:-1].encode("utf-8")
    body = body.replace(BASE_MARKER_JSON, b'"' + escaped_base)
    body = coding.encode(body, headers, gzip)
    return Response(body, media_type=media_type, headers=headers)


@router.get("/studies/{study}/metadata")
def study_metadata(request: Request, user: UserDep, study: str) -> Response:
    call = Call(request, user, "dicomweb.metadata")
    rows = call.rows(study)
    return _metadata(call, study, rows, "study", study)


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(request: Request, user: UserDep, study: str, series: str) -> Response:
    call = Call(request, user, "dicomweb.metadata")
    rows = call.rows(study, series)
    return _metadata(call, study, rows, "series", series)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def instance_metadata(
    request: Request, user: UserDep, study: str, series: str, instance: str
) -> Response:
    call = Call(request, user, "dicomweb.metadata")
    rows = call.rows(study, series, instance)
    return _metadata(call, study, rows, "instance", instance)


# ---------------------------------------------------------------------------- frames


def parse_frame_list(text: str) -> list[int]:
    """``1`` or ``1,2,3`` (1-based); raises ValueError with a message."""
    items = [p.strip() for p in text.split(",")]
    if not items or any(not p.isdigit() for p in items):
        raise ValueError(
            f"frame numbers must be positive integers separated by commas, not {text[:40]!r}"
        )
    numbers = [int(p) for p in items]
    if any(n < 1 for n in numbers):
        raise ValueError("frame numbers start at 1")
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise ValueError(f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    return numbers


def _frames_answer(
    call: Call, study: str, info: InstanceInfo, numbers: list[int], what: str
) -> Response:
    """Frames ``numbers`` of ``info``, negotiated; also Pixel Data as bulk data."""
    request = call.request
    ranges = accept_ranges(call, study, what)
    try:
        numbers = info.check_frames(numbers)
    except (NoPixelData, BadFrame) as exc:
        call.bad_request(study, str(exc), what)
    syntax = info.syntax
    try:
        choice = mp.negotiate_frames(
            ranges, syntax, decodable=can_decode(syntax), single=len(numbers) == 1
        )
    except mp.NotAcceptable as exc:
        call.negotiation_failed(study, exc, what)
    gzip = choice.transfer_syntax in GZIPPED_SYNTAXES and coding.wants_gzip(request.headers)
    etag = make_etag(
        "frames", info.row.sop_instance_uid, info.row.sha256, ",".join(map(str, numbers)),
        choice.media_type, choice.transfer_syntax, choice.convert, choice.multipart, gzip,
    )  # fmt: skip
    headers = cache_headers(etag, immutable=True)
    if choice.transfer_syntax in GZIPPED_SYNTAXES:
        headers = coding.vary(headers)
    detail = f"{what} as {choice.transfer_syntax}"
    if not_modified(request.headers, etag):
        call.ok(study, detail + " not modified")
        return answer_not_modified(headers)
    try:
        bodies = list(call.store.frames(info, numbers, convert=choice.convert))
    except InstanceError as exc:
        call.fail(422, str(exc), study_uid=study, detail=f"unreadable: {detail}"[:255])
    except Exception as exc:  # a codec refusing corrupt data: every plugin raises its own
        logger.warning("decoding %s failed: %s", info.row.sop_instance_uid, exc)
        call.fail(
            422,
            f"cannot decode the frames ({syntax}): {exc}",
            study_uid=study,
            detail=f"undecodable: {detail}"[:255],
        )
    call.ok(study, detail[:255])
    part_ct = mp.content_type(choice.media_type, choice.transfer_syntax)
    if not choice.multipart:
        return single_part(request, coding.encode(bodies[0], headers, gzip), part_ct, headers)
    parts = [(part_ct, body) for body in bodies]
    return multipart_response(mp.boundary_for(etag), choice.media_type, parts, headers, gzip)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}")
def instance_frames(
    request: Request, user: UserDep, study: str, series: str, instance: str, frames: str
) -> Response:
    call = Call(request, user, "dicomweb.frames")
    rows = call.rows(study, series, instance)
    what = f"frames {frames[:40]} of {instance}"
    try:
        numbers = parse_frame_list(frames)
    except ValueError as exc:
        call.bad_request(study, str(exc), what)
    info = info_or_fail(call, study, rows[0])
    return _frames_answer(call, study, info, numbers, what)


# ---------------------------------------------------------------------------- bulk data


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulk/{path:path}")
def instance_bulk(
    request: Request, user: UserDep, study: str, series: str, instance: str, path: str
) -> Response:
    """Values metadata gave as BulkDataURI. Pixel Data is its frames (as ``frames/1..N``,
    negotiated the same way); any other value is its bytes as stored."""
    call = Call(request, user, "dicomweb.bulk")
    rows = call.rows(study, series, instance)
    steps = [s for s in path.strip("/").split("/") if s]
    what = f"bulk {path[:60]} of {instance}"
    info = info_or_fail(call, study, rows[0])
    if len(steps) == 1 and steps[0].upper() in _PIXEL_TAGS:
        if info.pixels is None:
            call.fail(404, "no such bulk data", study_uid=study, detail=f"refused: {what}")
        numbers = list(range(1, info.pixels.number_of_frames + 1))
        return _frames_answer(call, study, info, numbers, what)
    ranges = accept_ranges(call, study, what)
    try:
        choice = mp.negotiate_bulk(ranges)
    except mp.NotAcceptable as exc:
        call.negotiation_failed(study, exc, what)
    etag = make_etag("bulk", info.row.sop_instance_uid, info.row.sha256, path, choice.multipart)
    headers = cache_headers(etag, immutable=True)
    if not_modified(request.headers, etag):
        call.ok(study, what + " not modified")
        return answer_not_modified(headers)
    try:
        _vr, value = call.store.bulk(rows[0], steps)
    except NoSuchBulkData as exc:
        call.fail(404, "no such bulk data", study_uid=study, detail=f"refused: {exc}"[:255])
    except InstanceError as exc:
        call.fail(422, str(exc), study_uid=study, detail=f"unreadable: {what}"[:255])
    call.ok(study, what)
    if not choice.multipart:
        return single_part(request, value, mp.OCTET_STREAM, headers)
    part_ct = mp.content_type(mp.OCTET_STREAM, info.syntax)
    return multipart_response(mp.boundary_for(etag), mp.OCTET_STREAM, [(part_ct, value)], headers)
