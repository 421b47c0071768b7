"""``/healthz`` (is the hub able to take studies?) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reading_queue.intake.archive import ArchiveError
from viewer_api.deps import IngestDep

router = APIRouter()


@router.get("/healthz")
def healthz(response: Response, ingest: IngestDep) -> dict[str, str]:
    try:
        ingest.archive.check()
    except ArchiveError as exc:
        response.status_code = 503
        return {"status": "degraded", "archive": str(exc)}
    return {"status": "ok", "archive": ingest.archive.name}


@router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
