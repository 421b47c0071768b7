"""The hub, assembled: registry, archive, ingest HTTP app and the hub's own DICOM listener.

Hospital PACS and modalities can send straight to the hub over DICOM: the same durable
listener as at the stations spools them and an in-process forwarder hands them to the ingest
service, so they follow the same receive-then-commit path as uploads from stations.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
import uvicorn

from reading_queue.intake.dicom_inbox import DicomInbox
from reading_queue.intake.index import count_unindexed
from reading_queue.intake.service import open_ingest
from reading_queue.settings import HubSettings
from reading_queue.worklist.worker import QueueWorker, open_worklist
from viewer_api.app import create_app

logger = logging.getLogger(__name__)


class Hub:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.ingest = open_ingest(settings)
        self.worklist = open_worklist(settings, self.ingest.engine, self.ingest.first_header)
        self.queue = QueueWorker(
            self.worklist,
            push=settings.assignment_mode == "push",
            interval_s=settings.queue_interval_s,
        )
        self.ingest.listeners.append(self.queue.notify)
        self.app = create_app(
            self.ingest,
            self.worklist,
            api_docs=settings.api_docs,
            metrics=settings.metrics_port < 0,
            max_body_bytes=settings.max_json_body_kb * 1024,
            cors_origins=settings.cors_origins,
        )
        self.inbox = DicomInbox(settings, self.ingest)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._metrics: WSGIServer | None = None
        self._stopping = threading.Event()

    def start_dicom(self) -> None:
        self.ingest.recover()
        unindexed = count_unindexed(self.ingest.engine)
        if unindexed:
            logger.warning(
                "%d archived instances are not in the DICOM index yet: DICOMweb and the "
                "viewer do not show them until `telerad hub reindex` has run",
                unindexed,
            )
        self.ingest.expire_uploads(self.settings.upload_expiry_s)
        threading.Thread(target=self._housekeeping, daemon=True, name="hub-housekeeping").start()
        self.inbox.start()
        self.queue.start()

    def start_http(self, *, log_level: str = "warning", **kw: Any) -> None:
        """Run uvicorn in a thread (tests, demo); ``serve`` blocks instead."""
        if self.settings.https_cert and self.settings.https_key:
            kw.setdefault("ssl_certfile", str(self.settings.https_cert))
            kw.setdefault("ssl_keyfile", str(self.settings.https_key))
        if self.settings.metrics_port >= 0 and self._metrics is None:
            # /metrics on its own plain-HTTP listener (loopback by default), not the public app.
            self._metrics, _ = prometheus_client.start_http_server(
                self.settings.metrics_port, addr=self.settings.metrics_host
            )
        config = uvicorn.Config(
            self.app,
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level=log_level,
            **kw,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="hub-http")
        self._thread.start()

    def _housekeeping(self) -> None:
        while not self._stopping.wait(3600.0):
            try:
                self.ingest.expire_uploads(self.settings.upload_expiry_s)
            except Exception:
                logger.exception("upload expiry failed")

    @property
    def http_port(self) -> int:
        assert self._server is not None
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("hub HTTP server not started")

    @property
    def metrics_port(self) -> int | None:
        """The separate metrics listener's port; None when /metrics is on the main app."""
        if self._metrics is None:
            return None
        return int(self._metrics.server_address[1])

    @property
    def started(self) -> bool:
        return self._server is not None and self._server.started

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
            if self._thread:
                self._thread.join(timeout=10)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        self.inbox.stop()
        self.queue.stop()
