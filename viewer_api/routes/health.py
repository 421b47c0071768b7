"""``/healthz`` (is the hub able to take studies?) and ``/metrics`` (Prometheus).

``/metrics`` is a router of its own: ``create_app`` leaves it out when the hub serves the
metrics on a separate listener (``metrics_port``), so they are not on the public port.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reading_queue.intake.archive import ArchiveError
from viewer_api.deps import IngestDep

router = APIRouter()
metrics_router = APIRouter()


@router.get("/healthz")
def healthz(response: Response, ingest: IngestDep) -> dict[str, Any]:
    """``ok``, or ``degraded`` (503) when the archive is unreachable or free disk is below
    twice the reserve -- before uploads are refused (507) at the reserve itself."""
    disk = ingest.disk_status()
    try:
        ingest.archive.check()
    except ArchiveError as exc:
        response.status_code = 503
        return {"status": "degraded", "archive": str(exc), "disk": disk}
    if disk["state"] != "ok":
        response.status_code = 503
        return {"status": "degraded", "archive": ingest.archive.name, "disk": disk}
    return {"status": "ok", "archive": ingest.archive.name, "disk": disk}


@metrics_router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
