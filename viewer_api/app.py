"""The hub's HTTP application: ``create_app(ingest)``; nothing is created at import time.

One router per resource under ``viewer_api/routes/``: ``ingest`` (the stations' upload
protocol) and ``health`` (health and metrics).
"""

from __future__ import annotations

from fastapi import FastAPI

from reading_queue.intake.service import IngestService
from telerad import __version__
from viewer_api.routes import health, ingest


def create_app(ingest_service: IngestService) -> FastAPI:
    app = FastAPI(title="telerad hub", version=__version__)
    app.state.ingest = ingest_service
    app.include_router(ingest.router)
    app.include_router(health.router)
    return app
