"""One worker per destination: picks the most urgent study with work, sends, commits, retries.

Order: priority (STAT first), then the age of the study. A more urgent study pre-empts the one
being sent between chunks (the transport asks ``preempt()``). Failures back off exponentially
with jitter, capped, forever: a station link may be down for hours, and nothing is dropped.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge

from dicom_gateway import GatewayError
from dicom_gateway.state import BUNDLED, COMMITTED, PENDING, UPLOADED, StateDB

logger = logging.getLogger(__name__)

COMMITS = Counter("telerad_forward_commits_total", "Studies committed", ["destination"])
FAILURES = Counter("telerad_forward_failures_total", "Transport failures", ["destination"])
BACKLOG = Gauge("telerad_forward_backlog_instances", "Instances not yet committed", ["destination"])


class TransportError(GatewayError):
    """The destination could not be reached or refused for now: retry later."""


@dataclass(frozen=True)
class StudyWork:
    study_uid: str
    priority: int
    first_received: float
    last_received: float
    to_send: int
    uploaded: int
    modality: str
    body_part: str


class Transport(Protocol):
    destination: str

    def send(self, study: StudyWork, preempt: Callable[[], bool]) -> bool:
        """Send the study's pending instances; False when pre-empted before the end."""

    def commit(self, study: StudyWork) -> None:
        """Ask the destination to commit the study's uploaded instances."""


class ForwardWorker(threading.Thread):
    def __init__(
        self,
        transport: Transport,
        state: StateDB,
        *,
        quiet_period_s: float,
        retry_max_s: float = 300.0,
        retry_base_s: float = 1.0,
    ) -> None:
        super().__init__(name=f"forward-{transport.destination}", daemon=True)
        self.transport = transport
        self.destination = transport.destination
        self.state = state
        self.quiet_period_s = quiet_period_s
        self.retry_max_s = retry_max_s
        self.retry_base_s = retry_base_s
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._failures = 0

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def notify(self) -> None:
        self.wake.set()

    # -- scheduling ------------------------------------------------------------------------

    def candidates(self, now: float | None = None) -> list[StudyWork]:
        """Studies with work for this destination, most urgent first. Instances waiting out
        their own back-off (``next_attempt``) do not count as work until they are due."""
        now = time.time() if now is None else now
        rows = self.state.query(
            "SELECT s.study_uid, s.priority, s.first_received, s.last_received, "
            "sum(d.state IN (?, ?) AND coalesce(d.next_attempt, 0) <= ?) AS to_send, "
            "sum(d.state = ?) AS uploaded, s.modality, s.body_part "
            "FROM deliveries d JOIN studies s ON s.study_uid = d.study_uid "
            "WHERE d.destination = ? AND d.state IN (?, ?, ?) "
            "GROUP BY s.study_uid ORDER BY s.priority, s.first_received",
            (PENDING, BUNDLED, now, UPLOADED, self.destination, PENDING, BUNDLED, UPLOADED),
        )
        return [StudyWork(*r) for r in rows]

    def next_due(self) -> float | None:
        """When the earliest instance waiting out its back-off becomes due."""
        due = self.state.scalar(
            "SELECT min(next_attempt) FROM deliveries WHERE destination = ? AND state = ?",
            (self.destination, PENDING),
        )
        return float(due) if due is not None else None

    def next_work(self, now: float) -> tuple[StudyWork | None, float]:
        """The study to act on now, and otherwise how long until one becomes complete."""
        wait = 5.0
        backlog = 0
        chosen: StudyWork | None = None
        for work in self.candidates(now):
            backlog += work.to_send + work.uploaded
            if chosen is not None:
                continue
            if work.to_send:
                chosen = work
                continue
            if not work.uploaded:
                continue  # only instances waiting out their back-off
            quiet_in = work.last_received + self.quiet_period_s - now
            if quiet_in <= 0:
                chosen = work
            else:
                wait = min(wait, quiet_in)
        due = self.next_due()
        if chosen is None and due is not None:
            wait = min(wait, due - now)
        BACKLOG.labels(self.destination).set(backlog)
        return chosen, max(wait, 0.05)

    def more_urgent_waiting(self, priority: int) -> bool:
        row = self.state.query(
            "SELECT 1 FROM deliveries d JOIN studies s ON s.study_uid = d.study_uid "
            "WHERE d.destination = ? AND d.state IN (?, ?) AND s.priority < ? "
            "AND coalesce(d.next_attempt, 0) <= ? LIMIT 1",
            (self.destination, PENDING, BUNDLED, priority, time.time()),
        )
        return bool(row)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        logger.info("forwarder for %s started", self.destination)
        while not self.stopping.is_set():
            before = self._progress_marker()
            try:
                progressed = self.step()
            except TransportError as exc:
                FAILURES.labels(self.destination).inc()
                if self._progress_marker() != before:
                    # It moved before it failed: a flaky link, not a dead one. Back-off
                    # growing over such failures once left an hour-long idle link.
                    self._failures = 0
                self._failures += 1
                delay = min(self.retry_max_s, self.retry_base_s * 2 ** min(self._failures, 16))
                delay = delay * (0.5 + random.random() / 2)  # jitter: stations don't stampede
                logger.warning(
                    "%s: %s; retry #%d in %.1f s", self.destination, exc, self._failures, delay
                )
                self.state.set_link(
                    self.destination, "down", str(exc), next_attempt=time.time() + delay
                )
                self.stopping.wait(delay)
                continue
            except Exception:
                # A bug must not stop forwarding forever; it is logged loudly and retried.
                logger.exception("%s: unexpected forwarder error", self.destination)
                self.stopping.wait(min(self.retry_max_s, 5.0))
                continue
            if self._failures:
                logger.info("%s: link is back after %d failures", self.destination, self._failures)
                self._failures = 0
            if not progressed:
                continue
        logger.info("forwarder for %s stopped", self.destination)

    def _progress_marker(self) -> tuple[int, int]:
        """Changes whenever anything moved: instances delivered, or bundle bytes accepted."""
        row = self.state.query(
            "SELECT (SELECT count(*) FROM deliveries WHERE destination = ? AND state != ?), "
            "(SELECT coalesce(sum(offset), 0) FROM bundles WHERE destination = ?)",
            (self.destination, PENDING, self.destination),
        )[0]
        return int(row[0]), int(row[1])

    def step(self) -> bool:
        """Do one unit of work; returns after waiting when there was nothing to do."""
        work, wait = self.next_work(time.time())
        if work is None:
            self.wake.wait(wait)
            self.wake.clear()
            return False
        if work.to_send:
            self.transport.send(work, lambda: self.more_urgent_waiting(work.priority))
            return True
        self.transport.commit(work)
        COMMITS.labels(self.destination).inc()
        return True


def mark_committed(state: StateDB, destination: str, study_uid: str, sop_uids: list[str]) -> None:
    now = time.time()
    with state.transaction() as db:
        db.executemany(
            "UPDATE deliveries SET state = ?, updated_at = ? "
            "WHERE destination = ? AND sop_instance_uid = ?",
            [(COMMITTED, now, destination, uid) for uid in sop_uids],
        )
        db.execute(
            "INSERT INTO commits (destination, study_uid, instance_count, committed_at) "
            "VALUES (?,?,?,?)",
            (destination, study_uid, len(sop_uids), now),
        )
