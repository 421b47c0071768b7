"""The prebuilt OHIF v3 viewer, served by the hub from the path root:
``/viewer?StudyInstanceUIDs=…`` opens a study, ``/`` is OHIF's study list.

Why the root and not ``/viewer/``: the pinned build is made for it. Its webpack runtime loads
every chunk, worker and wasm codec from ``"/"`` (``__webpack_require__.p = "/"`` in
``app.bundle.*.js``), its index.html names ``/app-config.js`` and ``/app.bundle.*.js``, and its
client routes (``/viewer``, ``/segmentation``, …) sit under ``routerBasename``. A sub-path
would mean rewriting the bundle, and OHIF is configured, never patched (docs/viewer.md).

So this router answers only the paths OHIF uses, each by an explicit route, and is included
last: the hub's ``/api/…``, ``/dicom-web/…``, ``/healthz``, ``/metrics`` and any page added
before it always win, and an unknown path stays a plain 404.

* ``/app-config.js`` is generated per request (``ohif_config``), never read from disk: one
  DICOMweb data source, the hub's own ``/dicom-web`` on the page's origin.
* ``/``, ``/viewer`` and OHIF's other mode routes answer index.html, or send a visitor without
  a session cookie to the sign-in page (``_signed_in``).
* Top-level files of the build and its asset directories are served from
  ``viewer/node_modules/@ohif/app/dist`` (``TELERAD_VIEWER_DIR`` overrides it), resolved and
  kept inside it; hashed bundles are cached for a year, the rest revalidated; a ``.br``/``.gz``
  sibling (``scripts/install_viewer.sh`` gzips at install time) is sent when accepted.
* Not installed: index.html and app-config.js answer 503 saying how to install it.

The static files hold no patient data, so they are served to anyone; the DICOMweb requests
the viewer makes carry the browser's session cookie (same origin) and are checked there.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from viewer_api.routes.auth import signed_in

router = APIRouter(tags=["viewer"], include_in_schema=False)

#: Where the built viewer is, when not in this checkout's ``viewer/`` (a packaged install).
VIEWER_DIR_ENV = "TELERAD_VIEWER_DIR"
DEFAULT_VIEWER_DIR = (
    Path(__file__).resolve().parents[2] / "viewer" / "node_modules" / "@ohif" / "app" / "dist"
)
INSTALL_HINT = "run scripts/install_viewer.sh"

#: The hub's DICOMweb root, on the viewer page's own origin.
DICOMWEB_PATH = "/dicom-web"
#: The hub's sign-in session cookie and page (``/login?next=…``).
LOGIN_PATH = "/login"

#: OHIF's client-side routes in the pinned build (its modes' ``routeName``): a reload there
#: must get index.html. ``/<route>/<dataSource>`` too.
OHIF_ROUTES = (
    "viewer",
    "segmentation",
    "tmtv",
    "microscopy",
    "usAnnotation",
    "dynamic-volume",
    "basic",
)
#: The build's top-level directories (tests check the installed build has no others).
ASSET_DIRS = ("assets", "ort", "dicom-microscopy-viewer")
#: Build files never served: answered by this module (index.html, app-config.js), other
#: hosts' deploy files and OHIF's sample Google Cloud config, and OHIF's service worker,
#: which imports Workbox from a CDN. (OHIF's own init-service-worker.js unregisters service
#: workers; sw.js stays unreachable.)
NOT_SERVED = frozenset(
    {"index.html", "app-config.js", "sw.js", "google.js", "_headers", "_redirects", "serve.json"}
)

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
#: A content hash in a file name: ``app.bundle.096daabbdde29bd851ab.js``, ``17dd…8bf8f.wasm``.
_HASHED = re.compile(r"(?:^|\.)[0-9a-f]{16,}\.")

MEDIA_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".json": "application/json",
    ".map": "application/json",
    ".webapp": "application/x-web-app-manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".xml": "application/xml",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".txt": "text/plain",
}
#: Content-Encoding -> file suffix, in order of preference.
_PRECOMPRESSED = (("br", ".br"), ("gzip", ".gz"))

_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}


def viewer_dir() -> Path:
    """The built viewer's directory (``index.html``, bundles, codecs), looked up per request
    so that an install or ``TELERAD_VIEWER_DIR`` takes effect without a restart."""
    override = os.environ.get(VIEWER_DIR_ENV, "").strip()
    return Path(override) if override else DEFAULT_VIEWER_DIR


def viewer_installed(dist: Path) -> bool:
    return (dist / "index.html").is_file()


# -- app-config.js -----------------------------------------------------------------------------


def ohif_config() -> dict[str, Any]:
    """OHIF's ``window.config`` for this hub, as data, modelled on OHIF's own
    ``platform/app/public/config/local_orthanc.js``. The data source roots are filled in by the
    page from its own origin (``app_config_js``), so a proxy in front changes nothing.

    One data source only: OHIF's ``dicomjson``/``dicomwebproxy`` sources would load studies
    from any URL given in the query string. No ``requestOptions``: the DICOMweb requests are
    same-origin, so the browser sends the session cookie with them by itself.
    """
    return {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showLoadingIndicator": True,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "dicomweb",
                "configuration": {
                    "friendlyName": "telerad hub",
                    "name": "telerad",
                    # set by app_config_js: window.location.origin + DICOMWEB_PATH
                    "qidoRoot": DICOMWEB_PATH,
                    "wadoRoot": DICOMWEB_PATH,
                    "wadoUriRoot": DICOMWEB_PATH,
                    "qidoSupportsIncludeField": True,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "supportsReject": False,
                    "supportsStow": False,
                    "dicomUploadEnabled": False,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }


def app_config_js() -> str:
    """``/app-config.js``: ``ohif_config`` as JSON, the DICOMweb roots set from the page's
    origin, and an error handler that sends the reader to sign in again when the hub answers
    401 (the session ended while reading)."""
    config = json.dumps(ohif_config(), indent=2, ensure_ascii=False)
    return f"""/* OHIF configuration for this telerad hub, made per request (viewer_api). */
window.config = {config};
(function (config) {{
  var root = window.location.origin + {json.dumps(DICOMWEB_PATH)};
  config.dataSources.forEach(function (source) {{
    source.configuration.qidoRoot = root;
    source.configuration.wadoRoot = root;
    source.configuration.wadoUriRoot = root;
  }});
  config.httpErrorHandler = function (error) {{
    if (error && error.status === 401) {{
      var here = window.location.pathname + window.location.search;
      window.location.assign({json.dumps(LOGIN_PATH)} + '?next=' + encodeURIComponent(here));
    }}
  }};
}})(window.config);
"""


# -- index.html, sign-in, security headers -----------------------------------------------------


def _signed_in(request: Request) -> bool:
    """Whether the visitor has a live session (or a valid bearer token): a dead cookie is
    sent to the sign-in page, not into a viewer whose every request would answer 401."""
    return signed_in(request) is not None


def content_security_policy(script_hashes: Iterable[str] = ()) -> str:
    """The viewer pages' CSP. OHIF needs ``'unsafe-eval'`` (its emscripten codecs build
    functions with ``new Function``), ``'wasm-unsafe-eval'``, workers from ``blob:`` and
    inline styles; its two inline scripts in index.html are allowed by hash. Everything else
    is this origin only: no CDN, no other data source."""
    scripts = " ".join(
        ["'self'", "'unsafe-eval'", "'wasm-unsafe-eval'", *(f"'{h}'" for h in script_hashes)]
    )
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src {scripts}",
            "worker-src 'self' blob:",
            "child-src 'self' blob:",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data: blob:",
            "font-src 'self' data:",
            "connect-src 'self' data: blob:",
            "media-src 'self' data: blob:",
            "object-src 'none'",
            "base-uri 'self'",
            "form-action 'self'",
            "frame-ancestors 'self'",
        ]
    )


@dataclass(frozen=True)
class _Index:
    body: bytes
    script_hashes: tuple[str, ...]


_INLINE_SCRIPT = re.compile(rb"<script\b([^>]*)>(.*?)</script\s*>", re.S | re.I)


@functools.lru_cache(maxsize=4)
def _load_index(path: str, mtime_ns: int, size: int) -> _Index:
    body = Path(path).read_bytes()
    hashes = tuple(
        "sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode()
        for attrs, script in _INLINE_SCRIPT.findall(body)
        if b"src=" not in attrs.lower()
    )
    return _Index(body, hashes)


def _html_headers(script_hashes: Iterable[str] = ()) -> dict[str, str]:
    return {
        **_SECURITY_HEADERS,
        "Content-Security-Policy": content_security_policy(script_hashes),
        "X-Frame-Options": "SAMEORIGIN",
        "Cache-Control": REVALIDATE,
    }


def _not_installed(request: Request, dist: Path) -> Response:
    detail = f"the viewer is not installed on this hub ({dist} has no index.html): {INSTALL_HINT}"
    if "text/html" in request.headers.get("accept", ""):
        page = (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<title>Viewer not installed</title></head><body>"
            "<h1>The viewer is not installed on this hub</h1>"
            f"<p>{html.escape(str(dist))} has no index.html. On the hub, "
            "<code>bash scripts/install_viewer.sh</code> installs it.</p></body></html>"
        )
        headers = {**_html_headers(), "Cache-Control": "no-store", "Retry-After": "60"}
        return HTMLResponse(page, status_code=503, headers=headers)
    return JSONResponse(
        {"detail": detail},
        status_code=503,
        headers={**_SECURITY_HEADERS, "Cache-Control": "no-store", "Retry-After": "60"},
    )


#: What may stay as it is in the query of a ``next`` target; the rest (a raw backslash, spaces,
#: non-ASCII) is percent-encoded, so the target is printable ASCII the sign-in page accepts.
_QUERY_SAFE = "/?=&%:@!$'()*+,;~-._"


def _request_target(request: Request) -> str:
    """The path and query the visitor asked for, to come back to after signing in."""
    query = request.url.query
    target = quote(request.url.path, safe="/")
    return f"{target}?{quote(query, safe=_QUERY_SAFE)}" if query else target


def _index(request: Request) -> Response:
    dist = viewer_dir()
    if not viewer_installed(dist):
        return _not_installed(request, dist)
    if not _signed_in(request):
        return RedirectResponse(
            f"{LOGIN_PATH}?next={quote(_request_target(request), safe='/')}",
            status_code=302,
            headers={**_SECURITY_HEADERS, "Cache-Control": "no-store"},
        )
    path = dist / "index.html"
    stat = path.stat()
    index = _load_index(str(path), stat.st_mtime_ns, stat.st_size)
    return HTMLResponse(index.body, headers=_html_headers(index.script_hashes))


# -- static files ------------------------------------------------------------------------------


def _inside(dist: Path, relative: str) -> Path | None:
    """The regular file ``relative`` names inside ``dist``, or None: no ``..``, no hidden
    names, nothing a symlink leads out of the build to."""
    parts = relative.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None
    root = dist.resolve()
    try:
        candidate = (root / relative).resolve()
    except (OSError, ValueError):
        return None
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


def _encoding_qualities(header: str) -> dict[str, float]:
    """``Accept-Encoding`` as coding -> q (``*`` stands for the codings not named)."""
    qualities: dict[str, float] = {}
    for item in header.split(","):
        coding, *params = (p.strip() for p in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if coding:
            qualities[coding.lower()] = quality
    return qualities


def _etag(stat: os.stat_result, coding: str) -> str:
    return f'"{stat.st_mtime_ns:x}-{stat.st_size:x}{"-" + coding if coding else ""}"'


def _static(request: Request, relative: str) -> Response:
    dist = viewer_dir()
    name = relative.rsplit("/", 1)[-1]
    if "/" not in relative and name in NOT_SERVED:
        return Response(status_code=404, headers=_SECURITY_HEADERS)
    path = _inside(dist, relative)
    if path is None:
        return Response(status_code=404, headers=_SECURITY_HEADERS)
    media_type = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    headers = {
        **_SECURITY_HEADERS,
        "Cache-Control": IMMUTABLE if _HASHED.search(name) else REVALIDATE,
    }
    if media_type == "text/html":
        headers.update(_html_headers())
    served, coding = path, ""
    variants = [(c, path.with_name(path.name + s)) for c, s in _PRECOMPRESSED]
    variants = [(c, p) for c, p in variants if p.is_file()]
    if variants:
        headers["Vary"] = "Accept-Encoding"
        qualities = _encoding_qualities(request.headers.get("accept-encoding", ""))
        for candidate_coding, candidate in variants:
            if qualities.get(candidate_coding, qualities.get("*", 0.0)) > 0:
                served, coding = candidate, candidate_coding
                headers["Content-Encoding"] = coding
                break
    stat = served.stat()
    etag = _etag(stat, coding)
    headers["ETag"] = etag
    if etag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
        headers.pop("Content-Encoding", None)
        return Response(status_code=304, headers=headers)
    return FileResponse(served, media_type=media_type, headers=headers, stat_result=stat)


# -- routes (GET and HEAD; order matters: the explicit paths first) ----------------------------

_METHODS = ["GET", "HEAD"]


@router.api_route("/app-config.js", methods=_METHODS)
def app_config(request: Request) -> Response:
    dist = viewer_dir()
    if not viewer_installed(dist):
        return _not_installed(request, dist)
    return Response(
        app_config_js(),
        media_type="text/javascript",
        headers={**_SECURITY_HEADERS, "Cache-Control": REVALIDATE},
    )


@router.api_route("/", methods=_METHODS)
def study_list(request: Request) -> Response:
    return _index(request)


def _add_ohif_route(route: str) -> None:
    def page(request: Request) -> Response:
        return _index(request)

    def page_in(request: Request, rest: str) -> Response:
        return _index(request)

    router.add_api_route(f"/{route}", page, methods=_METHODS, name=f"ohif_{route}")
    router.add_api_route(
        f"/{route}/{{rest:path}}", page_in, methods=_METHODS, name=f"ohif_{route}_sub"
    )


for _route in OHIF_ROUTES:
    _add_ohif_route(_route)


def _add_asset_dir(directory: str) -> None:
    def asset(request: Request, rest: str) -> Response:
        return _static(request, f"{directory}/{rest}")

    router.add_api_route(
        f"/{directory}/{{rest:path}}", asset, methods=_METHODS, name=f"ohif_{directory}"
    )


for _directory in ASSET_DIRS:
    _add_asset_dir(_directory)


@router.api_route("/{name}", methods=_METHODS)
def top_level_file(request: Request, name: str) -> Response:
    """A file at the top of the build: bundles, codecs, fonts, manifest, icons."""
    return _static(request, name)
