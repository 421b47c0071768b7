"""The hub's HTTP application: ``create_app(settings)``; nothing is created at import time."""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reading_queue.archive import ArchiveError
from reading_queue.ingest import IngestService
from telerad import __version__
from viewer_api.routes import ingest as ingest_routes


def create_app(ingest: IngestService) -> FastAPI:
    app = FastAPI(title="telerad hub", version=__version__)
    app.state.ingest = ingest
    app.include_router(ingest_routes.router)

    @app.get("/healthz")
    def healthz(response: Response) -> dict[str, str]:
        try:
            ingest.archive.check()
        except ArchiveError as exc:
            response.status_code = 503
            return {"status": "degraded", "archive": str(exc)}
        return {"status": "ok", "archive": ingest.archive.name}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
