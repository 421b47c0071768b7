"""Request dependencies: the hub services and the authenticated station."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from reading_queue.intake.service import IngestService


def get_ingest(request: Request) -> IngestService:
    ingest: IngestService = request.app.state.ingest
    return ingest


IngestDep = Annotated[IngestService, Depends(get_ingest)]


def current_station(request: Request, ingest: IngestDep) -> str:
    """Stations send ``Authorization: Bearer <token>`` (from ``telerad hub station add``)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "station token required: Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    station = ingest.authenticate(token.strip())
    if station is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "unknown or revoked station token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return station


StationDep = Annotated[str, Depends(current_station)]
