"""The hub, assembled: registry, archive, ingest HTTP app and the hub's own DICOM listener.

Hospital PACS and modalities can send straight to the hub over DICOM: the same durable
listener as at the stations spools them and an in-process forwarder hands them to the ingest
service, so they follow the same receive-then-commit path as uploads from stations.
"""

from __future__ import annotations

import logging
import threading
from io import BytesIO
from typing import Any

import uvicorn
from prometheus_client import Counter, Gauge
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_gateway.forward.dicom import LocalTransport
from dicom_gateway.forward.worker import ForwardWorker
from dicom_gateway.scp import Listener
from dicom_gateway.service import recover
from dicom_gateway.spool import Spool
from dicom_gateway.state import StateDB
from reading_queue import QueueError
from reading_queue.archive import ArchiveError, open_archive
from reading_queue.ingest import IngestService, StudyCommitted
from reading_queue.models import make_engine
from reading_queue.roster import load_roster
from reading_queue.worklist import Worklist
from telerad.config import HubSettings
from viewer_api.app import create_app

logger = logging.getLogger(__name__)


def open_ingest(settings: HubSettings) -> IngestService:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url())
    return IngestService(settings.data_dir, engine, open_archive(settings))


def open_worklist(settings: HubSettings, ingest: IngestService) -> Worklist:
    def header(study_uid: str) -> Dataset | None:
        """One instance's header: accession, patient identity (for priors), description."""
        for inst in ingest.study_instances(study_uid)[:1]:
            try:
                data = ingest.archive.retrieve(inst.archive_ref)
            except ArchiveError:
                logger.warning("no header for study %s: archive unavailable", study_uid)
                return None
            return dcmread(BytesIO(data), stop_before_pixels=True)
        return None

    worklist = Worklist(
        ingest.engine,
        settings.queue_policy,
        webhook_urls=settings.escalation_webhooks,
        stat_webhook_urls=settings.stat_webhooks,
        header_reader=header,
    )
    if settings.roster_file is not None and not worklist.has_roster():
        # A seed: applied to an empty hub only, so later admin changes survive restarts
        # (`telerad hub roster load` applies a file on purpose).
        tokens = worklist.load_roster(load_roster(settings.roster_file))
        logger.info("roster seeded from %s", settings.roster_file)
        for name in tokens:
            logger.info(
                "station %s created from the roster; issue its token with "
                "`telerad hub station token %s`",
                name,
                name,
            )
    return worklist


OPEN_STUDIES = Gauge(
    "telerad_worklist_open_studies", "Studies on the worklist", ["state", "priority"]
)
OVERDUE = Gauge("telerad_worklist_overdue_studies", "Open studies past their SLA", ["priority"])
DECISIONS = Counter("telerad_worklist_decisions_total", "Engine decisions applied", ["kind"])


class QueueWorker(threading.Thread):
    """Feeds the worklist: new studies in, rounds (push mode), leases, escalations, webhooks.

    Woken at once when a study is committed, otherwise every ``interval_s``. Errors are
    logged and retried at the next tick: the worklist's state is in the database."""

    def __init__(self, worklist: Worklist, *, push: bool, interval_s: float) -> None:
        super().__init__(daemon=True, name="hub-queue")
        self.worklist = worklist
        self.push = push
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.rounds = 0

    def notify(self, _event: StudyCommitted | None = None) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def tick(self) -> None:
        self.worklist.consume_events()
        result = self.worklist.run_round(assign=self.push)
        for kind, n in (
            ("assign", result.assigned),
            ("reassign", result.reassigned),
            ("release", result.released),
            ("escalate", result.escalated),
        ):
            if n:
                DECISIONS.labels(kind).inc(n)
        self.worklist.deliver_webhooks()
        counts = self.worklist.counts()
        for state in ("received", "ready", "assigned", "in_progress"):
            for prio in ("stat", "urgent", "routine"):
                OPEN_STUDIES.labels(state, prio).set(counts["by_state"].get(f"{state}/{prio}", 0))
        for prio in ("stat", "urgent", "routine"):
            OVERDUE.labels(prio).set(counts["overdue"].get(prio, 0))
        self.rounds += 1

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except QueueError as exc:
                logger.warning("worklist round failed: %s", exc)
            except Exception:
                logger.exception("worklist round failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()


class Hub:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.ingest = open_ingest(settings)
        self.worklist = open_worklist(settings, self.ingest)
        self.queue = QueueWorker(
            self.worklist,
            push=settings.assignment_mode == "push",
            interval_s=settings.queue_interval_s,
        )
        self.ingest.listeners.append(self.queue.notify)
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
        self.queue.start()

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
        self.queue.stop()
        self.worker.stop()
        self.worker.join(timeout=10)
        self.state.close()
