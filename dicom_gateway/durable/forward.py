"""One worker per destination: picks the most urgent study with work, sends, commits, retries.

Order: priority (STAT first), then the age of the study. The worker does one unit of work at
a time -- one bundle, or one commit -- and chooses again after each, so a STAT never waits for
the rest of a routine study; within a unit, a more urgent study with bytes to send or ready
to commit pre-empts it between chunks (the transport asks ``preempt()``).

A study is complete, and may be committed, when everything is uploaded and either

* the association that sent it was released (A-RELEASE) with no other open association
  adding to it, ``release_settle_s`` ago (5 s by default), or
* nothing arrived for ``quiet_period_s`` (60 s): the fallback for associations that stay
  open or abort.

Late instances become a follow-up commit. (mercure waits a fixed ``series_timeout``;
Orthanc's ``StableAge`` is a quiet period alone -- the release is what most modalities say
when they are done, so it is the faster signal and the quiet period stays the safety net.)

Link failures back off exponentially with jitter, capped, forever: a station link may be down
for hours, and nothing is dropped. A study the destination *refuses* (``StudyRefused``) backs
off alone, and after ``refusal_budget`` refusals steps aside as ``needs attention`` until
``telerad gateway retry``: one poison study never holds back the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge

from dicom_gateway import GatewayError
from dicom_gateway.durable.state import BUNDLED, COMMITTED, PENDING, UPLOADED, StateDB
from telerad.core.backoff import backoff_delay

logger = logging.getLogger(__name__)

COMMITS = Counter("telerad_forward_commits_total", "Studies committed", ["destination"])
FAILURES = Counter("telerad_forward_failures_total", "Transport failures", ["destination"])
REFUSALS = Counter("telerad_forward_refusals_total", "Studies refused", ["destination"])
ATTENTION = Gauge(
    "telerad_forward_attention_studies", "Studies held aside (needs attention)", ["destination"]
)
BACKLOG = Gauge("telerad_forward_backlog_instances", "Instances not yet committed", ["destination"])

#: How often ``preempt()`` looks at the database at most (it is asked once per chunk).
_PREEMPT_CHECK_S = 0.2


class TransportError(GatewayError):
    """The destination could not be reached or refused for now: retry later."""


class StudyRefused(TransportError):
    """The destination answered, and refused this study (not the link): a 4xx, a checksum
    or a conflict. Counted against the study's refusal budget; other studies keep going."""


def complete_in(
    now: float,
    last_received: float,
    released_at: float | None,
    *,
    quiet_period_s: float,
    release_settle_s: float,
) -> float:
    """Seconds until a study counts as complete (<= 0: complete now)."""
    quiet = last_received + quiet_period_s - now
    if released_at is not None and released_at >= last_received:
        return min(quiet, released_at + release_settle_s - now)
    return quiet


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
    released_at: float | None = None


class Transport(Protocol):
    destination: str

    def send(self, study: StudyWork, preempt: Callable[[], bool]) -> bool:
        """Send the next unit of the study's pending instances (one bundle, or what the
        destination takes in one go); False when pre-empted before its end."""

    def commit(self, study: StudyWork) -> None:
        """Ask the destination to commit the study's uploaded instances."""


class ForwardWorker(threading.Thread):
    def __init__(
        self,
        transport: Transport,
        state: StateDB,
        *,
        quiet_period_s: float,
        release_settle_s: float = 5.0,
        refusal_budget: int = 3,
        retry_max_s: float = 300.0,
        retry_base_s: float = 1.0,
    ) -> None:
        super().__init__(name=f"forward-{transport.destination}", daemon=True)
        self.transport = transport
        self.destination = transport.destination
        self.state = state
        self.quiet_period_s = quiet_period_s
        self.release_settle_s = release_settle_s
        self.refusal_budget = refusal_budget
        self._preempt_checked: tuple[float, int, bool] = (0.0, -1, False)
        self.retry_max_s = retry_max_s
        self.retry_base_s = retry_base_s
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._failures = 0
        self._current: StudyWork | None = None

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def notify(self) -> None:
        self.wake.set()

    # -- scheduling ------------------------------------------------------------------------

    def candidates(self, now: float | None = None, *, below: int | None = None) -> list[StudyWork]:
        """Studies with work for this destination, most urgent first (only those more urgent
        than ``below`` when given). Instances waiting out their own back-off
        (``next_attempt``) do not count as work until they are due, nor do studies held aside
        or waiting out a refusal."""
        now = time.time() if now is None else now
        rows = self.state.query(
            "SELECT s.study_uid, s.priority, s.first_received, s.last_received, "
            "sum(d.state IN (?, ?) AND coalesce(d.next_attempt, 0) <= ?) AS to_send, "
            "sum(d.state = ?) AS uploaded, s.modality, s.body_part, s.released_at "
            "FROM deliveries d JOIN studies s ON s.study_uid = d.study_uid "
            "LEFT JOIN attention a ON a.destination = d.destination "
            "AND a.study_uid = d.study_uid "
            "WHERE d.destination = ? AND d.state IN (?, ?, ?) AND s.priority < ? "
            "AND a.held_at IS NULL AND coalesce(a.retry_at, 0) <= ? "
            "GROUP BY s.study_uid ORDER BY s.priority, s.first_received",
            (
                PENDING,
                BUNDLED,
                now,
                UPLOADED,
                self.destination,
                PENDING,
                BUNDLED,
                UPLOADED,
                99 if below is None else below,
                now,
            ),
        )
        return [StudyWork(*r) for r in rows]

    def complete_in(self, work: StudyWork, now: float) -> float:
        return complete_in(
            now,
            work.last_received,
            work.released_at,
            quiet_period_s=self.quiet_period_s,
            release_settle_s=self.release_settle_s,
        )

    def next_due(self) -> float | None:
        """When the earliest instance or refused study waiting out its back-off is due."""
        due = self.state.scalar(
            "SELECT min(t) FROM (SELECT min(next_attempt) AS t FROM deliveries "
            "WHERE destination = ? AND state = ? UNION ALL SELECT min(retry_at) FROM attention "
            "WHERE destination = ? AND held_at IS NULL)",
            (self.destination, PENDING, self.destination),
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
            ready_in = self.complete_in(work, now)
            if ready_in <= 0:
                chosen = work
            else:
                wait = min(wait, ready_in)
        due = self.next_due()
        if chosen is None and due is not None:
            wait = min(wait, due - now)
        BACKLOG.labels(self.destination).set(backlog)
        self._count_attention()  # also after `gateway retry`, which runs in another process
        return chosen, max(wait, 0.05)

    def _count_attention(self) -> None:
        ATTENTION.labels(self.destination).set(
            self.state.scalar(
                "SELECT count(*) FROM attention WHERE destination = ? AND held_at IS NOT NULL",
                (self.destination,),
            )
            or 0
        )

    def more_urgent_waiting(self, priority: int) -> bool:
        """A more urgent study has bytes to send or is ready to commit: asked between chunks,
        so answered from a cached look at most every 0.2 s."""
        now = time.monotonic()
        checked_at, checked_for, answer = self._preempt_checked
        if checked_for == priority and now - checked_at < _PREEMPT_CHECK_S:
            return answer
        wall = time.time()
        answer = any(
            w.to_send or (w.uploaded and self.complete_in(w, wall) <= 0)
            for w in self.candidates(wall, below=priority)
        )
        self._preempt_checked = (now, priority, answer)
        return answer

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        logger.info("forwarder for %s started", self.destination)
        while not self.stopping.is_set():
            before = self._progress_marker()
            try:
                progressed = self.step()
            except StudyRefused as exc:
                self._refused(exc)
                continue
            except TransportError as exc:
                FAILURES.labels(self.destination).inc()
                if self._progress_marker() != before:
                    # It moved before it failed: a flaky link, not a dead one. Back-off
                    # growing over such failures once left an hour-long idle link.
                    self._failures = 0
                self._failures += 1
                delay = backoff_delay(
                    self._failures, base_s=self.retry_base_s, cap_s=self.retry_max_s
                )
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
        """Do one unit of work (one bundle or one commit); after waiting when there was
        nothing to do."""
        work, wait = self.next_work(time.time())
        if work is None:
            self.wake.wait(wait)
            self.wake.clear()
            return False
        self._current = work
        self._preempt_checked = (0.0, -1, False)
        if work.to_send:
            self.transport.send(work, lambda: self.more_urgent_waiting(work.priority))
            return True
        self.transport.commit(work)
        self.state.clear_refusals(self.destination, work.study_uid)
        COMMITS.labels(self.destination).inc()
        return True

    def _refused(self, exc: StudyRefused) -> None:
        work = self._current
        REFUSALS.labels(self.destination).inc()
        if work is None:
            logger.error("%s: refusal outside a study: %s", self.destination, exc)
            return
        refusals = 1 + int(
            self.state.scalar(
                "SELECT refusals FROM attention WHERE destination = ? AND study_uid = ?",
                (self.destination, work.study_uid),
            )
            or 0
        )
        delay = backoff_delay(refusals, base_s=self.retry_base_s * 5, cap_s=self.retry_max_s)
        held = self.state.record_refusal(
            self.destination,
            work.study_uid,
            str(exc),
            budget=self.refusal_budget,
            retry_at=time.time() + delay,
        )
        if held:
            logger.error(
                "%s: study %s needs attention after %d refusals: %s "
                "(after a fix: telerad gateway retry %s)",
                self.destination,
                work.study_uid,
                refusals,
                exc,
                work.study_uid,
            )
        else:
            logger.warning(
                "%s: study %s refused (%d/%d): %s; other studies go on, this one again in %.0f s",
                self.destination,
                work.study_uid,
                refusals,
                self.refusal_budget,
                exc,
                delay,
            )
        self._count_attention()


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
