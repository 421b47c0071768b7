"""The audit trail: every read of patient data and every action by a person, append-only.

``record()`` only appends to a queue in memory, so auditing never slows a request (a frame
read must not wait for a database write); one writer thread inserts the queue in batches,
every ``interval_s`` or as soon as ``batch_size`` events wait. A failed write keeps its
events queued and is tried again; ``close()`` stops the writer and writes what is left, and
anything recorded after that is written at once, so a clean stop loses nothing. A crash
loses at most the last ``interval_s`` of events.

The vocabulary is DICOM's (PS3.15 A.5, after RFC 3881): the EventID (``action``), the
EventActionCode (C, R, U, D, E) and the EventOutcomeIndicator (0, 4, 8, 12). The table
refuses UPDATE and DELETE itself (migration 0005). ``detail`` never holds patient names or
IDs: a study is named by its UID only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any, Final, Protocol

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from reading_queue.models import AuditEvent

logger = logging.getLogger(__name__)

# EventIDs (DICOM PS3.15 A.5.3) this hub writes.
USER_AUTHENTICATION: Final = "User Authentication"
INSTANCES_ACCESSED: Final = "DICOM Instances Accessed"
PATIENT_RECORD: Final = "Patient Record"
QUERY: Final = "Query"
SECURITY_ALERT: Final = "Security Alert"
AUDIT_LOG_USED: Final = "Audit Log Used"
EXPORT: Final = "Export"
STUDY_DELETED: Final = "DICOM Study Deleted"
INSTANCES_TRANSFERRED: Final = "DICOM Instances Transferred"

#: Each EventID with its usual EventActionCode (PS3.15 A.5.3), the default of ``record``.
ACTIONS: Final[dict[str, str]] = {
    USER_AUTHENTICATION: "E",
    INSTANCES_ACCESSED: "R",
    PATIENT_RECORD: "R",
    QUERY: "E",
    SECURITY_ALERT: "E",
    AUDIT_LOG_USED: "R",
    EXPORT: "R",
    STUDY_DELETED: "D",
    INSTANCES_TRANSFERRED: "R",
}
ACTION_CODES: Final = frozenset("CRUDE")

DEFAULT_INTERVAL_S: Final = 0.5
DEFAULT_BATCH_SIZE: Final = 500
MAX_LIMIT: Final = 1000


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


_OUTCOMES: Final = frozenset(int(o) for o in Outcome)


class Caller(Protocol):
    """Who acted: ``reading_queue.accounts.Principal`` (not imported: its own room)."""

    @property
    def username(self) -> str: ...

    @property
    def role(self) -> str: ...


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: float
    username: str
    role: str
    action: str
    action_code: str
    event_type: str
    study_uid: str | None
    address: str
    outcome: int
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n]


class AuditTrail:
    def __init__(
        self,
        engine: Engine,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0 or batch_size < 1:
            raise ValueError("interval_s must be > 0 and batch_size >= 1")
        self.engine = engine
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.clock = clock
        self._queue: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()  # the queue's state: closed, writer started
        self._write_lock = threading.Lock()  # one writer at a time keeps the order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- writing ---------------------------------------------------------------------------

    def record(
        self,
        who: Caller | str,
        role: str,
        event_type: str,
        action: str,
        *,
        action_code: str | None = None,
        study_uid: str | None = None,
        address: str = "",
        outcome: int = Outcome.SUCCESS,
        detail: str = "",
    ) -> None:
        """Queue one event; never touches the database (but after ``close()``, see above).

        ``who`` is a principal or a username (as typed, for a refused sign-in); an empty
        ``role`` is the principal's."""
        if isinstance(who, str):
            username = who
        else:
            username, role = who.username, role or who.role
        code = action_code if action_code is not None else ACTIONS.get(action)
        if code is None:
            raise ValueError(f"EventID {action!r} needs an action_code (one of C R U D E)")
        if code not in ACTION_CODES:
            raise ValueError(f"EventActionCode must be one of C R U D E, not {code!r}")
        if outcome not in _OUTCOMES:
            raise ValueError(f"EventOutcomeIndicator must be 0, 4, 8 or 12, not {outcome!r}")
        row = {
            "at": self.clock(),
            "username": _cut(username, 64),
            "role": _cut(role, 16),
            "action": _cut(action, 64),
            "action_code": code,
            "event_type": _cut(event_type, 32),
            "study_uid": study_uid,
            "address": _cut(address, 64),
            "outcome": int(outcome),
            "detail": _cut(detail, 255),
        }
        with self._lock:
            self._queue.append(row)
            if not self._closed:
                if self._thread is None:
                    self._start()
                if len(self._queue) >= self.batch_size:
                    self._wake.set()
                return
        # Closed: nobody will write it later. Written now, behind whatever this thread (or
        # any other) queued before the close, so each caller's events keep their order.
        self.flush()

    def record_reads(
        self,
        who: Caller,
        study_uids: Iterable[str],
        *,
        event_type: str = "study.search",
        action: str = QUERY,
        address: str = "",
        outcome: int = Outcome.SUCCESS,
        detail: str = "",
    ) -> None:
        """A search (QIDO-RS) answered: one event per study it returned."""
        for uid in study_uids:
            self.record(
                who, "", event_type, action,
                study_uid=uid, address=address, outcome=outcome, detail=detail,
            )  # fmt: skip

    @property
    def pending(self) -> int:
        return len(self._queue)

    def flush(self) -> int:
        """Write every event queued so far; returns how many. Raises if the database
        refuses (the events stay queued)."""
        written = 0
        with self._write_lock:
            while self._queue:
                batch: list[dict[str, Any]] = []
                while self._queue and len(batch) < self.batch_size:
                    batch.append(self._queue.popleft())
                try:
                    self._insert(batch)
                except BaseException:
                    self._queue.extendleft(reversed(batch))  # keep them, in order
                    raise
                written += len(batch)
        return written

    def close(self) -> None:
        """Stop the writer and write what is left; later events are written at once."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join()
        self.flush()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="audit-writer")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                logger.exception("audit write failed; %d events kept to retry", self.pending)
                self._stop.wait(self.interval_s)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(AuditEvent), rows)

    # -- reading ---------------------------------------------------------------------------

    def query(
        self,
        *,
        username: str | None = None,
        study_uid: str | None = None,
        event_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        outcome: int | None = None,
        limit: int = 100,
        after_id: int | None = None,
    ) -> list[AuditRecord]:
        """Written events, oldest first; page on with ``after_id`` = the last id seen."""
        return query_events(
            self.engine,
            username=username,
            study_uid=study_uid,
            event_type=event_type,
            since=since,
            until=until,
            outcome=outcome,
            limit=limit,
            after_id=after_id,
        )


def query_events(
    engine: Engine,
    *,
    username: str | None = None,
    study_uid: str | None = None,
    event_type: str | None = None,
    since: float | None = None,
    until: float | None = None,
    outcome: int | None = None,
    limit: int = 100,
    after_id: int | None = None,
) -> list[AuditRecord]:
    """``AuditTrail.query`` without a trail (the CLI reads, it never writes)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1 to {MAX_LIMIT}")
    stmt = select(AuditEvent).order_by(AuditEvent.id).limit(limit)
    if username is not None:
        stmt = stmt.where(AuditEvent.username == username)
    if study_uid is not None:
        stmt = stmt.where(AuditEvent.study_uid == study_uid)
    if event_type is not None:
        stmt = stmt.where(AuditEvent.event_type == event_type)
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if until is not None:
        stmt = stmt.where(AuditEvent.at < until)
    if outcome is not None:
        stmt = stmt.where(AuditEvent.outcome == outcome)
    if after_id is not None:
        stmt = stmt.where(AuditEvent.id > after_id)
    with engine.execution_options(read_only=True).connect() as conn:
        return [
            AuditRecord(
                id=e.id,
                at=e.at,
                username=e.username,
                role=e.role,
                action=e.action,
                action_code=e.action_code,
                event_type=e.event_type,
                study_uid=e.study_uid,
                address=e.address,
                outcome=e.outcome,
                detail=e.detail,
            )
            for e in conn.execute(stmt)
        ]
