"""The hub, assembled: registry, archive, ingest HTTP app and the hub's own DICOM listener.

Hospital PACS and modalities can send straight to the hub over DICOM: the same durable
listener as at the stations spools them and an in-process forwarder hands them to the ingest
service, so they follow the same receive-then-commit path as uploads from stations.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import uvicorn

from dicom_gateway.forward.dicom import LocalTransport
from dicom_gateway.forward.worker import ForwardWorker
from dicom_gateway.scp import Listener
from dicom_gateway.service import recover
from dicom_gateway.spool import Spool
from dicom_gateway.state import StateDB
from reading_queue.archive import open_archive
from reading_queue.ingest import IngestService
from reading_queue.models import make_engine
from telerad.config import HubSettings
from viewer_api.app import create_app

logger = logging.getLogger(__name__)


def open_ingest(settings: HubSettings) -> IngestService:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url())
    return IngestService(settings.data_dir, engine, open_archive(settings))


class Hub:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.ingest = open_ingest(settings)
        self.app = create_app(self.ingest)
        inbox = settings.data_dir / "dicom-inbox"
        self.spool = Spool(inbox)
        self.state = StateDB(inbox / "inbox.sqlite3")
        self.transport = LocalTransport(
            destination="archive", ingest=self.ingest, state=self.state, spool=self.spool
        )
        self.worker = ForwardWorker(
            self.transport, self.state, quiet_period_s=settings.quiet_period_s, retry_max_s=60
        )
        self.listener = Listener(
            settings, self.spool, self.state, ["archive"], on_stored=lambda _: self.worker.notify()
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start_dicom(self) -> None:
        self.ingest.recover()
        self.ingest.expire_uploads(self.settings.upload_expiry_s)
        threading.Thread(target=self._housekeeping, daemon=True, name="hub-housekeeping").start()
        recover(self.spool, self.state, self.settings)
        self.state.ensure_deliveries(["archive"])
        if self.settings.dicom_port >= 0:
            self.listener.start()
        self.worker.start()

    def start_http(self, *, log_level: str = "warning", **kw: Any) -> None:
        """Run uvicorn in a thread (tests, demo); ``serve`` blocks instead."""
        if self.settings.https_cert and self.settings.https_key:
            kw.setdefault("ssl_certfile", str(self.settings.https_cert))
            kw.setdefault("ssl_keyfile", str(self.settings.https_key))
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
    def started(self) -> bool:
        return self._server is not None and self._server.started

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
            if self._thread:
                self._thread.join(timeout=10)
        self.listener.stop()
        self.worker.stop()
        self.worker.join(timeout=10)
        self.state.close()
