"""Request dependencies: the hub services and the authenticated station.

Stations are authenticated by ``StationAuth``, an ASGI middleware in front of the upload
protocol, before any request body is read: FastAPI parses a JSON body before it runs the
route's dependencies, so a dependency alone would let anyone make the hub read and parse a
body. ``StationDep`` then only picks up the station the middleware found.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from reading_queue.intake.service import IngestService

#: Where ``StationAuth`` leaves the authenticated station's name in the ASGI scope.
STATION_SCOPE_KEY = "telerad.station"
#: Paths whose requests need a station token (the tus OPTIONS discovery request does not).
STATION_PREFIX = "/api/v1/ingest/"


def get_ingest(request: Request) -> IngestService:
    ingest: IngestService = request.app.state.ingest
    return ingest


IngestDep = Annotated[IngestService, Depends(get_ingest)]


class Unauthorized(Exception):
    """No usable station token; the message says what is wrong."""


def authenticate_station(authorization: str, ingest: IngestService) -> str:
    """The station named by ``Authorization: Bearer <token>`` (``telerad hub station add``)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("station token required: Authorization: Bearer <token>")
    station = ingest.authenticate(token.strip())
    if station is None:
        raise Unauthorized("unknown or revoked station token")
    return station


def current_station(request: Request, ingest: IngestDep) -> str:
    station = request.scope.get(STATION_SCOPE_KEY)
    if isinstance(station, str):
        return station
    try:
        return authenticate_station(request.headers.get("authorization", ""), ingest)
    except Unauthorized as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None


StationDep = Annotated[str, Depends(current_station)]


def _announces_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


class StationAuth:
    """Refuses requests to the upload protocol without a valid station token (401) before
    a byte of their body is read; the connection is closed when a body was announced, so
    the hub does not read it to reach the next request either."""

    def __init__(self, app: ASGIApp, ingest: IngestService) -> None:
        self.app = app
        self.ingest = ingest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not scope["path"].startswith(STATION_PREFIX)
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            station = await run_in_threadpool(
                authenticate_station, headers.get("authorization", ""), self.ingest
            )
        except Unauthorized as exc:
            body = json.dumps({"detail": str(exc)}).encode()
            extra = [(b"connection", b"close")] if _announces_body(headers) else []
            await send(
                {
                    "type": "http.response.start",
                    "status": status.HTTP_401_UNAUTHORIZED,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b"Bearer"),
                        *extra,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        scope[STATION_SCOPE_KEY] = station
        await self.app(scope, receive, send)
