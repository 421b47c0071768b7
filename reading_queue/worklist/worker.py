"""The hub's queue worker: feeds the worklist from the intake outbox and runs its rounds.

New studies come in through the ``study_events`` outbox (the one seam between intake and
worklist); rounds assign (push mode), release expired leases and escalate; webhooks go out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client import Counter, Gauge
from pydicom.dataset import Dataset
from sqlalchemy.engine import Engine

from reading_queue import QueueError
from reading_queue.settings import HubSettings
from reading_queue.worklist.roster import load_roster
from reading_queue.worklist.service import Worklist

logger = logging.getLogger(__name__)


def open_worklist(
    settings: HubSettings, engine: Engine, header_reader: Callable[[str], Dataset | None]
) -> Worklist:
    """The worklist on the hub's database; ``header_reader`` gives one instance's header of a
    study (accession, patient identity for priors, description), read from the archive."""
    worklist = Worklist(
        engine,
        settings.queue_policy,
        webhook_urls=settings.escalation_webhooks,
        stat_webhook_urls=settings.stat_webhooks,
        header_reader=header_reader,
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


class WebhookWorker(threading.Thread):
    """Delivers the webhook outbox (escalations, STAT pages) on its own thread, with short
    timeouts: a pager that never answers delays its own deliveries, never a round."""

    def __init__(self, worklist: Worklist, *, interval_s: float, timeout_s: float = 5.0):
        super().__init__(daemon=True, name="hub-webhooks")
        self.worklist = worklist
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()

    def notify(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        while not self._stop.is_set():
            timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 3.0))
            try:
                with httpx.Client(timeout=timeout) as client:
                    self.worklist.deliver_webhooks(client=client)
            except Exception:
                logger.exception("webhook delivery failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()


class QueueWorker(threading.Thread):
    """Feeds the worklist: new studies in, rounds (push mode), leases, escalations; its
    ``webhooks`` thread delivers what the rounds queued.

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
        self.webhooks = WebhookWorker(worklist, interval_s=interval_s)

    def start(self) -> None:
        self.webhooks.start()
        super().start()

    def notify(self, _event: Any = None) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.webhooks.stop()

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
        self.webhooks.notify()  # delivered on its own thread: a hung pager never delays this
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
