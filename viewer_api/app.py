"""The hub's HTTP application: ``create_app(ingest, worklist)``; nothing is created at import
time.

One router per resource under ``viewer_api/routes/``: ``ingest`` (the stations' upload
protocol), ``auth`` (people signing in), ``worklist`` and ``studies`` (the radiologist's
API), ``audit``, ``health`` (health and metrics), ``viewer`` (the OHIF viewer); DICOMweb in
``viewer_api/dicomweb``. Every route that touches a study asks ``reading_queue.access``.

Closed by default: the OpenAPI schema and its pages are off unless asked for (``api_docs``),
requests to the upload protocol are authenticated before their body is read
(``deps.StationAuth``), and request bodies are limited (``BodyLimit``) before anything
parses them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reading_queue.access import Access
from reading_queue.accounts import Accounts
from reading_queue.audit import AuditTrail
from reading_queue.intake.service import IngestService
from reading_queue.worklist.service import Worklist
from telerad import __version__
from viewer_api import dicomweb
from viewer_api.csrf import CsrfProtection
from viewer_api.deps import StationAuth
from viewer_api.dicomweb.wado import warm_headers_on_commit
from viewer_api.routes import audit, auth, health, ingest, login, studies, viewer
from viewer_api.routes import worklist as worklist_routes

#: Manifests and commits; a 5,000-instance study's manifest is ~600 KB.
DEFAULT_MAX_BODY = 8 * 1024 * 1024
#: tus PATCH requests carry bundle bytes: the upload route streams them to disk and holds
#: them to the upload's own length (``routes.ingest.MAX_BUNDLE``).
TUS_UPLOADS = "/api/v1/ingest/uploads/"


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:g} MiB" if n >= 1024 * 1024 else f"{n} bytes"


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413 before the app reads them.

    A declared ``Content-Length`` over the limit is refused at once, without reading a byte;
    a body without one (chunked) is counted as it streams in, and the request is refused as
    soon as it passes the limit: the app then sees the client gone and its answer is
    replaced by the 413. tus PATCH uploads (``TUS_UPLOADS``) are left to their route.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["method"] == "PATCH" and scope["path"].startswith(TUS_UPLOADS)
        ):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._refuse(send, 400, "Content-Length is not a number")
                return
            if length > self.max_bytes:
                await self._refuse(
                    send,
                    413,
                    f"request body of {_size(length)} is over this hub's limit of "
                    f"{_size(self.max_bytes)} (max_json_body_kb)",
                )
                return
        received = 0
        over = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a "disconnect"; the 413 goes out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await self._refuse(
                send,
                413,
                f"request body passed this hub's limit of {_size(self.max_bytes)} "
                "(max_json_body_kb)",
            )

    @staticmethod
    async def _refuse(send: Send, code: int, detail: str) -> None:
        # The rest of the body is never read: close the connection rather than drain it.
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.audit.close()  # on stop: the queued audit events are written, none lost


def create_app(
    ingest_service: IngestService,
    worklist: Worklist,
    *,
    api_docs: bool = False,
    metrics: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The hub's HTTP app. ``api_docs`` serves /docs, /redoc and /openapi.json; ``metrics``
    serves /metrics here (off when the hub has a separate metrics listener);
    ``cors_origins`` are the web origins whose pages may call the hub (none by default)."""
    app = FastAPI(
        title="telerad hub",
        version=__version__,
        docs_url="/docs" if api_docs else None,
        redoc_url="/redoc" if api_docs else None,
        openapi_url="/openapi.json" if api_docs else None,
        lifespan=_lifespan,
    )
    app.state.ingest = ingest_service
    app.state.accounts = Accounts(ingest_service.engine)
    app.state.audit = AuditTrail(ingest_service.engine)
    app.state.worklist = worklist
    app.state.access = Access(ingest_service.engine)
    app.include_router(ingest.router)
    app.include_router(auth.router)
    app.include_router(login.router)
    app.include_router(audit.router)
    app.include_router(worklist_routes.router)
    app.include_router(studies.router)
    app.include_router(dicomweb.router)
    warm_headers_on_commit(app)
    app.include_router(health.router)
    if metrics:
        app.include_router(health.metrics_router)
    app.include_router(viewer.router)  # last: its catch-all paths never shadow the API
    # The last added runs first: a request is authenticated before its size is looked at,
    # so an unauthenticated one is 401 however large its body says it is; the CSRF check of
    # browser sessions runs last, so the form bodies it reads are already size-limited.
    app.add_middleware(CsrfProtection, accounts=app.state.accounts, audit=app.state.audit)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(StationAuth, ingest=ingest_service)
    if cors_origins:
        # Outermost: a preflight is answered before anything asks for credentials. Exact
        # origins only, with credentials (a page elsewhere signs in with a bearer token; the
        # session cookie is SameSite=Lax and never travels cross-site).
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_credentials=True,
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Accept",
                "Content-Type",
                "X-CSRF-Token",
                "Last-Event-ID",
            ],
            expose_headers=["ETag", "Content-Length", "Content-Type", "Warning", "Retry-After"],
            max_age=600,
        )
    return app
