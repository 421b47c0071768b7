"""Rendered and thumbnail images (PS3.18 §10.4.1.1.3, §10.4.1.1.4): JPEG or PNG of a frame,
through ``viewer_api.rendering`` and its on-disk ``RenderCache``.

Routes (under ``/dicom-web``), each also with ``/thumbnail`` in place of ``/rendered``::

    GET /studies/{s}/rendered
    GET /studies/{s}/series/{se}/rendered
    GET /studies/{s}/series/{se}/instances/{i}/rendered
    GET /studies/{s}/series/{se}/instances/{i}/frames/{n}/rendered

Media type from ``accept=`` (wins, as PS3.18 says) or ``Accept``: ``image/jpeg`` (default,
also for ``image/*`` and ``*/*``) or ``image/png``; anything else 406. Parameters:
``window=center,width[,function]`` (modality units, function linear, linear-exact or
sigmoid), ``viewport=width,height`` (the image fitted inside, aspect kept; the cropping form
``vw,vh,sx,sy,sw,sh`` is refused with 400 rather than silently ignored), ``quality=1..100``
(JPEG); ``annotation``, ``charset`` and ``iccprofile`` are accepted and ignored (nothing is
burnt in). Malformed values: 400.

Where PS3.18 answers a study, a series or a multi-frame instance with every image in a
multipart body, this answers one representative image, as Orthanc does and as thumbnails
need: the middle instance (by Instance Number) of the series with the most images (study
level) or of the series; frame 1 of an instance for ``/rendered``, its middle frame for
``/thumbnail`` (128×128 unless ``viewport`` says otherwise).

Access, 404s and the audit trail are those of ``wado`` (``dicomweb.rendered`` and
``dicomweb.thumbnail`` events). Rendering runs in the thread pool (these are plain ``def``
routes); results are cached on disk by everything that determines them, including the
instance's sha256, so an ETag is the cache key and instance-level images are immutable.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from fastapi import APIRouter, Request, Response
from starlette.background import BackgroundTask

from viewer_api.dicomweb import multipart as mp
from viewer_api.dicomweb.instances import InstanceError, InstanceInfo, InstanceRow
from viewer_api.dicomweb.wado import (
    Call,
    answer_not_modified,
    cache_headers,
    info_or_fail,
    not_modified,
)
from viewer_api.rendering import (
    FrameNotFound,
    InvalidRenderParameter,
    NotRenderable,
    RenderCache,
    RenderError,
    RenderKey,
    UnsupportedMediaType,
    parse_viewport,
    parse_window,
    render,
)
from viewer_api.routes.auth import UserDep

logger = logging.getLogger(__name__)

router = APIRouter()

#: On-disk cap for rendered images (a setting to come: ``render_cache_mb``).
RENDER_CACHE_BYTES: Final = 512 * 1024 * 1024
THUMBNAIL_SIZE: Final = 128
DEFAULT_QUALITY: Final = 90

_cache_lock = threading.Lock()


def render_cache(request: Request) -> RenderCache:
    state = request.app.state
    found: RenderCache | None = getattr(state, "dicomweb_render_cache", None)
    if found is None:
        with _cache_lock:
            found = getattr(state, "dicomweb_render_cache", None)
            if found is None:
                directory = state.ingest.data_dir / "cache" / "rendered"
                found = RenderCache(directory, RENDER_CACHE_BYTES)
                state.dicomweb_render_cache = found
    return found


class _Params:
    """The request's rendering parameters, checked before any pixel is read."""

    def __init__(self, call: Call, study: str, *, thumbnail: bool) -> None:
        query = call.request.query_params
        what = "thumbnail" if thumbnail else "rendered"
        accept = query.get("accept") or call.request.headers.get("accept")
        try:
            self.media_type = mp.negotiate_rendered(mp.parse_accept(accept))
        except (mp.AcceptError, mp.NotAcceptable) as exc:
            call.negotiation_failed(study, exc, what)
        self.window: tuple[float, float, str] | None = None
        self.viewport: tuple[int, int] | None = (
            (THUMBNAIL_SIZE, THUMBNAIL_SIZE) if thumbnail else None
        )
        self.quality = DEFAULT_QUALITY
        try:
            if "window" in query:
                self.window = parse_window(query["window"])
            if "viewport" in query:
                self.viewport = parse_viewport(query["viewport"])
            if "quality" in query:
                text = query["quality"].strip()
                if not text.isdigit() or not 1 <= int(text) <= 100:
                    raise InvalidRenderParameter(f"quality must be 1..100, not {text[:20]!r}")
                self.quality = int(text)
        except InvalidRenderParameter as exc:
            call.bad_request(study, str(exc), what)
        if self.media_type != "image/jpeg":
            self.quality = DEFAULT_QUALITY  # PNG is lossless: one cache entry whatever q is


def _image_infos(call: Call, study: str, rows: list[InstanceRow]) -> list[InstanceInfo]:
    infos = []
    for row in rows:
        try:
            info = call.store.info(row)
        except InstanceError as exc:
            logger.warning("not rendering %s: %s", row.sop_instance_uid, exc)
            continue
        if info.pixels is not None:
            infos.append(info)
    return infos


def _middle(infos: list[InstanceInfo]) -> InstanceInfo:
    ordered = sorted(
        enumerate(infos),
        key=lambda p: (p[1].instance_number is None, p[1].instance_number or 0, p[0]),
    )
    return ordered[(len(ordered) - 1) // 2][1]


def representative(call: Call, study: str, rows: list[InstanceRow], what: str) -> InstanceInfo:
    """The middle image of the series with the most images (of ``rows``)."""
    infos = _image_infos(call, study, rows)
    if not infos:
        call.bad_request(study, "nothing to render: no instance here has pixel data", what)
    by_series: dict[str, list[InstanceInfo]] = {}
    for info in infos:
        by_series.setdefault(info.row.series_uid, []).append(info)

    def rank(item: tuple[str, list[InstanceInfo]]) -> tuple[int, int, str]:
        uid, members = item
        numbers = [m.series_number for m in members if m.series_number is not None]
        return (-len(members), min(numbers) if numbers else 1 << 30, uid)

    _uid, members = min(by_series.items(), key=rank)
    return _middle(members)


def _render(
    call: Call,
    study: str,
    info: InstanceInfo,
    frame: int | None,
    params: _Params,
    *,
    thumbnail: bool,
    immutable: bool,
    what: str,
) -> Response:
    if info.pixels is None:
        call.bad_request(study, "the instance has no pixel data: nothing to render", what)
    if frame is None:
        frames = info.pixels.number_of_frames
        frame = (frames + 1) // 2 if thumbnail else 1
    key = RenderKey(
        sop_instance_uid=info.row.sop_instance_uid,
        frame=frame,
        media_type=params.media_type,
        window=params.window,
        viewport=params.viewport,
        quality=params.quality,
        version=info.row.sha256,
    )
    etag = f'"{key.digest()[:40]}"'
    headers = cache_headers(etag, immutable=immutable)
    detail = f"{what}: {info.row.sop_instance_uid} frame {frame} as {params.media_type}"[:255]
    if not_modified(call.request.headers, etag):
        call.ok(study, detail[:240] + " (304)")
        return answer_not_modified(headers)
    cache = render_cache(call.request)

    def produce() -> bytes:
        ds = call.store.dataset(info.row)
        return render(
            ds,
            frame,
            media_type=params.media_type,
            window=params.window,
            viewport=params.viewport,
            quality=params.quality,
        )

    stored = cache.get(key)
    try:
        image = stored if stored is not None else produce()
    except FrameNotFound as exc:
        call.bad_request(study, str(exc), what)
    except InvalidRenderParameter as exc:
        call.bad_request(study, str(exc), what)
    except UnsupportedMediaType as exc:
        call.negotiation_failed(study, exc, what)
    except NotRenderable as exc:
        call.fail(422, str(exc), study_uid=study, detail=f"not renderable: {detail}"[:255])
    except RenderError as exc:
        call.bad_request(study, str(exc), what)
    except InstanceError as exc:
        call.fail(422, str(exc), study_uid=study, detail=f"unreadable: {detail}"[:255])
    call.ok(study, detail)
    # Kept for next time after the answer has gone: the reader does not wait for the write.
    later = None if stored is not None else BackgroundTask(cache.put, key, image)
    return Response(image, media_type=params.media_type, headers=headers, background=later)


def _study(request: Request, user: UserDep, study: str, *, thumbnail: bool) -> Response:
    call = Call(request, user, "dicomweb.thumbnail" if thumbnail else "dicomweb.rendered")
    rows = call.rows(study)
    params = _Params(call, study, thumbnail=thumbnail)
    what = f"{'thumbnail' if thumbnail else 'rendered'} study {study}"
    info = representative(call, study, rows, what)
    return _render(call, study, info, None, params, thumbnail=thumbnail, immutable=False, what=what)


def _series(
    request: Request, user: UserDep, study: str, series: str, *, thumbnail: bool
) -> Response:
    call = Call(request, user, "dicomweb.thumbnail" if thumbnail else "dicomweb.rendered")
    rows = call.rows(study, series)
    params = _Params(call, study, thumbnail=thumbnail)
    what = f"{'thumbnail' if thumbnail else 'rendered'} series {series}"
    info = representative(call, study, rows, what)
    return _render(call, study, info, None, params, thumbnail=thumbnail, immutable=False, what=what)


def _instance(
    request: Request,
    user: UserDep,
    study: str,
    series: str,
    instance: str,
    frame: str | None,
    *,
    thumbnail: bool,
) -> Response:
    call = Call(request, user, "dicomweb.thumbnail" if thumbnail else "dicomweb.rendered")
    rows = call.rows(study, series, instance)
    kind = "thumbnail" if thumbnail else "rendered"
    what = f"{kind} instance {instance}" + (f" frame {frame[:20]}" if frame else "")
    number: int | None = None
    if frame is not None:
        text = frame.strip()
        if not text.isdigit() or int(text) < 1:
            call.bad_request(study, f"one frame number (1, 2, ...) per request, not {text!r}", what)
        number = int(text)
    params = _Params(call, study, thumbnail=thumbnail)
    info = info_or_fail(call, study, rows[0])
    return _render(
        call, study, info, number, params, thumbnail=thumbnail, immutable=True, what=what
    )


@router.get("/studies/{study}/rendered")
def study_rendered(request: Request, user: UserDep, study: str) -> Response:
    return _study(request, user, study, thumbnail=False)


@router.get("/studies/{study}/thumbnail")
def study_thumbnail(request: Request, user: UserDep, study: str) -> Response:
    return _study(request, user, study, thumbnail=True)


@router.get("/studies/{study}/series/{series}/rendered")
def series_rendered(request: Request, user: UserDep, study: str, series: str) -> Response:
    return _series(request, user, study, series, thumbnail=False)


@router.get("/studies/{study}/series/{series}/thumbnail")
def series_thumbnail(request: Request, user: UserDep, study: str, series: str) -> Response:
    return _series(request, user, study, series, thumbnail=True)


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
def instance_rendered(
    request: Request, user: UserDep, study: str, series: str, instance: str
) -> Response:
    return _instance(request, user, study, series, instance, None, thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail")
def instance_thumbnail(
    request: Request, user: UserDep, study: str, series: str, instance: str
) -> Response:
    return _instance(request, user, study, series, instance, None, thumbnail=True)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered")
def frame_rendered(
    request: Request, user: UserDep, study: str, series: str, instance: str, frame: str
) -> Response:
    return _instance(request, user, study, series, instance, frame, thumbnail=False)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/thumbnail")
def frame_thumbnail(
    request: Request, user: UserDep, study: str, series: str, instance: str, frame: str
) -> Response:
    return _instance(request, user, study, series, instance, frame, thumbnail=True)
