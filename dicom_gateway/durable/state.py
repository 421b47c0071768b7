"""The gateway's embedded state database (SQLite, WAL, synchronous=FULL).

Every fact the gateway acts on lives here, written in transactions: which instances are
durable in the spool, which study they belong to and its priority, the delivery state of each
instance for each destination, bundles being uploaded and the quarantine. Files on disk are
only payload; a file without a row is an orphan from a crash and is cleaned up at start.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_gateway import GatewayError

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    received_at REAL NOT NULL,
    deleted_at REAL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    priority INTEGER NOT NULL,
    priority_manual INTEGER NOT NULL DEFAULT 0,
    modality TEXT NOT NULL DEFAULT '',
    body_part TEXT NOT NULL DEFAULT '',
    calling_aet TEXT NOT NULL DEFAULT '',
    accession_hash TEXT NOT NULL DEFAULT '',
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    -- when the last association adding to the study was released (A-RELEASE) with no other
    -- open association adding to it; NULL while one is open, or when it aborted
    released_at REAL
);
CREATE TABLE IF NOT EXISTS deliveries (
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    bundle_id INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status TEXT NOT NULL DEFAULT '',
    -- a refused instance waits alone (NULL: due now), so it never blocks other studies
    next_attempt REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_study ON deliveries(destination, study_uid, state);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(destination, state);
CREATE TABLE IF NOT EXISTS bundles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    length INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    upload_url TEXT,
    offset INTEGER NOT NULL DEFAULT 0,
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS commits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    instance_count INTEGER NOT NULL,
    committed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER NOT NULL,
    calling_aet TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
-- A study a destination keeps refusing (4xx, checksum, conflict): retried with back-off,
-- then held aside (needs attention) after the refusal budget, until `gateway retry`.
CREATE TABLE IF NOT EXISTS attention (
    destination TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    refusals INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    retry_at REAL,
    held_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (destination, study_uid)
);
CREATE TABLE IF NOT EXISTS links (
    destination TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    last_ok REAL,
    last_attempt REAL,
    next_attempt REAL,
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    rate_bps REAL NOT NULL DEFAULT 0
);
"""

#: Bumped with every schema change; ``StateDB._migrate`` brings older databases forward.
SCHEMA_VERSION = 2

#: Delivery states, per destination and instance, in the order they are reached.
PENDING = "pending"  # durable in the spool, nothing sent yet
BUNDLED = "bundled"  # packed into a bundle that is being uploaded
UPLOADED = "uploaded"  # the destination holds it, study not yet committed
COMMITTED = "committed"  # the destination committed it: the spool copy may go
FAILED = "failed"  # the destination refused it for good (recorded, kept, not retried)


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: str
    size: int
    sha256: str
    calling_aet: str
    received_at: float


@dataclass(frozen=True)
class StudyInfo:
    """What the listener learned about a study from one instance's header."""

    study_uid: str
    modality: str
    body_part: str
    calling_aet: str
    priority: int


@dataclass(frozen=True)
class Bundle:
    id: int
    destination: str
    study_uid: str
    path: str
    length: int
    raw_bytes: int
    count: int
    sha256: str
    upload_url: str | None
    offset: int
    bytes_sent: int


class StateDB:
    """Thread-safe access to the gateway state; one connection guarded by a lock.

    pynetdicom runs one thread per association and the forwarders run their own; SQLite
    serialises writers anyway, so a single connection with a lock is simplest and avoids
    ``database is locked`` retries.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a killed process (it is in the OS), and
            # after a power cut the last commits can roll back -- but every instance file is
            # fsynced before its row is written, and start-up recovery re-indexes spool files
            # without a row, so nothing acknowledged is lost. This saves one fsync per C-STORE.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()

    def _migrate(self) -> None:
        """Bring any earlier database to ``SCHEMA_VERSION`` (``PRAGMA user_version``).

        A station's spool may hold days of unsent studies when telerad is upgraded, so the
        state is migrated in place, never recreated. Each step is idempotent.
        """
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise GatewayError(
                f"{self.path} has schema {version}, newer than this telerad ({SCHEMA_VERSION})"
            )
        self._conn.executescript(SCHEMA)  # creates what is missing (new databases)
        columns = {
            table: {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
            for table in ("instances", "deliveries", "studies")
        }
        if "dataset_sha256" in columns["instances"]:  # v0 (first release candidate)
            self._conn.execute("ALTER TABLE instances DROP COLUMN dataset_sha256")
        if "next_attempt" not in columns["deliveries"]:
            self._conn.execute("ALTER TABLE deliveries ADD COLUMN next_attempt REAL")
        if "released_at" not in columns["studies"]:  # v1 -> v2
            self._conn.execute("ALTER TABLE studies ADD COLUMN released_at REAL")
        self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``durable`` commits with ``synchronous=FULL``: the WAL is
        fsynced before this returns, so what a person decided (a priority, a retry), a
        quarantine record and the janitor's deletions survive a power cut -- instances need
        no such fsync (recovery re-indexes them from the spool), decisions do."""
        with self._lock:
            if durable:
                self._conn.execute("PRAGMA synchronous=FULL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                else:
                    self._conn.execute("COMMIT")
            finally:
                if durable:
                    self._conn.execute("PRAGMA synchronous=NORMAL")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    # -- instances -------------------------------------------------------------------------

    def get_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        rows = self.query(
            "SELECT sop_instance_uid, sop_class_uid, study_uid, series_uid, transfer_syntax, "
            "path, size, sha256, calling_aet, received_at "
            "FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        return InstanceRecord(*rows[0]) if rows else None

    def known_paths(self) -> set[str]:
        return {r[0] for r in self.query("SELECT path FROM instances WHERE deleted_at IS NULL")}

    def record_instance(
        self, rec: InstanceRecord, study: StudyInfo, destinations: Sequence[str]
    ) -> bool:
        """Record a durable instance, its study and one pending delivery per destination.

        Returns False when the instance was already recorded (an idempotent re-send or the
        start-up re-index of a file whose C-STORE was never answered).
        """
        now = rec.received_at
        with self.transaction() as db:
            cur = db.execute(
                # ON CONFLICT, not OR IGNORE: only "already recorded" is ignored; any other
                # constraint failure must raise, never end as a Success without a row.
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, "
                "series_uid, transfer_syntax, path, size, sha256, calling_aet, "
                "received_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(sop_instance_uid) DO NOTHING",
                (
                    rec.sop_instance_uid,
                    rec.sop_class_uid,
                    rec.study_uid,
                    rec.series_uid,
                    rec.transfer_syntax,
                    rec.path,
                    rec.size,
                    rec.sha256,
                    rec.calling_aet,
                    now,
                ),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                "INSERT INTO studies (study_uid, priority, modality, body_part, calling_aet, "
                "first_received, last_received, instance_count, bytes) "
                "VALUES (?,?,?,?,?,?,?,1,?) "
                "ON CONFLICT(study_uid) DO UPDATE SET "
                "last_received = max(last_received, excluded.last_received), "
                "instance_count = instance_count + 1, bytes = bytes + excluded.bytes, "
                "priority = CASE WHEN priority_manual = 1 THEN priority "
                "ELSE min(priority, excluded.priority) END, "
                "modality = CASE WHEN modality = '' THEN excluded.modality ELSE modality END, "
                "body_part = CASE WHEN body_part = '' THEN excluded.body_part "
                "ELSE body_part END",
                (
                    study.study_uid,
                    study.priority,
                    study.modality,
                    study.body_part,
                    study.calling_aet,
                    now,
                    now,
                    rec.size,
                ),
            )
            db.executemany(
                "INSERT INTO deliveries (destination, sop_instance_uid, study_uid, "
                "state, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(destination, sop_instance_uid) DO NOTHING",
                [(d, rec.sop_instance_uid, rec.study_uid, PENDING, now) for d in destinations],
            )
            return True

    def ensure_deliveries(self, destinations: Sequence[str]) -> int:
        """Give every instance a delivery row for destinations added after it arrived."""
        added = 0
        with self.transaction() as db:
            for dest in destinations:
                cur = db.execute(
                    "INSERT INTO deliveries (destination, sop_instance_uid, study_uid, "
                    "state, updated_at) SELECT ?, sop_instance_uid, study_uid, ?, ? "
                    "FROM instances WHERE deleted_at IS NULL "
                    "ON CONFLICT(destination, sop_instance_uid) DO NOTHING",
                    (dest, PENDING, time.time()),
                )
                added += cur.rowcount
        return added

    # -- studies ---------------------------------------------------------------------------

    def set_priority(self, study_uid: str, priority: int) -> None:
        with self.transaction(durable=True) as db:
            cur = db.execute(
                "UPDATE studies SET priority = ?, priority_manual = 1 WHERE study_uid = ?",
                (priority, study_uid),
            )
            if cur.rowcount != 1:
                raise GatewayError(f"no study {study_uid} in this gateway")

    def failed_deliveries(self, destination: str, study_uid: str) -> list[tuple[str, str]]:
        """The study's instances ``destination`` refused for good, with why: told to the
        destination at commit, so the study is marked incomplete there."""
        return [
            (r[0], r[1])
            for r in self.query(
                "SELECT sop_instance_uid, last_status FROM deliveries WHERE destination = ? "
                "AND study_uid = ? AND state = ?",
                (destination, study_uid, FAILED),
            )
        ]

    def mark_released(self, study_uids: Sequence[str], at: float | None = None) -> None:
        """The association adding to these studies was released and no other is open."""
        at = time.time() if at is None else at
        with self.transaction() as db:
            db.executemany(
                "UPDATE studies SET released_at = ? WHERE study_uid = ?",
                [(at, uid) for uid in study_uids],
            )

    # -- refusals and attention ------------------------------------------------------------

    def record_refusal(
        self, destination: str, study_uid: str, reason: str, *, budget: int, retry_at: float
    ) -> bool:
        """Count one refusal; True when the study has now used its budget and is held."""
        now = time.time()
        with self.transaction(durable=True) as db:
            db.execute(
                "INSERT INTO attention (destination, study_uid, refusals, reason, retry_at, "
                "updated_at) VALUES (?,?,1,?,?,?) ON CONFLICT(destination, study_uid) DO "
                "UPDATE SET refusals = refusals + 1, reason = excluded.reason, "
                "retry_at = excluded.retry_at, updated_at = excluded.updated_at",
                (destination, study_uid, reason[:1000], retry_at, now),
            )
            refusals = db.execute(
                "SELECT refusals FROM attention WHERE destination = ? AND study_uid = ?",
                (destination, study_uid),
            ).fetchone()[0]
            if refusals >= budget:
                db.execute(
                    "UPDATE attention SET held_at = ? WHERE destination = ? AND study_uid = ?",
                    (now, destination, study_uid),
                )
                return True
        return False

    def clear_refusals(self, destination: str, study_uid: str) -> None:
        """The destination accepted the study: its refusal count starts again."""
        with self.transaction() as db:
            db.execute(
                "DELETE FROM attention WHERE destination = ? AND study_uid = ? AND held_at IS NULL",
                (destination, study_uid),
            )

    def retry_study(self, study_uid: str) -> int:
        """`gateway retry`: send a held study again (and instances refused for good)."""
        now = time.time()
        with self.transaction(durable=True) as db:
            known = db.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if known is None:
                raise GatewayError(f"no study {study_uid} in this gateway")
            held = db.execute("DELETE FROM attention WHERE study_uid = ?", (study_uid,)).rowcount
            failed = db.execute(
                "UPDATE deliveries SET state = ?, attempts = 0, next_attempt = NULL, "
                "last_status = '', updated_at = ? WHERE study_uid = ? AND state = ?",
                (PENDING, now, study_uid, FAILED),
            ).rowcount
        return int(held) + int(failed)

    def attention_list(self) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.query(
                "SELECT destination, study_uid, refusals, reason, held_at, retry_at "
                "FROM attention ORDER BY held_at IS NULL, updated_at"
            )
        ]

    # -- quarantine ------------------------------------------------------------------------

    def record_quarantine(
        self,
        *,
        path: str,
        reason: str,
        status: int,
        calling_aet: str,
        sop_instance_uid: str = "",
        study_uid: str = "",
    ) -> None:
        with self.transaction(durable=True) as db:
            db.execute(
                "INSERT INTO quarantine (path, reason, status, calling_aet, sop_instance_uid, "
                "study_uid, created_at) VALUES (?,?,?,?,?,?,?)",
                (path, reason, status, calling_aet, sop_instance_uid, study_uid, time.time()),
            )

    # -- links -----------------------------------------------------------------------------

    def set_link(
        self,
        destination: str,
        state: str,
        detail: str = "",
        *,
        ok: bool = False,
        next_attempt: float | None = None,
        sent: int = 0,
        rate_bps: float | None = None,
    ) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO links (destination, state, detail, last_ok, last_attempt, "
                "next_attempt, bytes_sent, rate_bps) VALUES (?,?,?,?,?,?,?,?) "
                "ON CONFLICT(destination) DO UPDATE SET state = excluded.state, "
                "detail = excluded.detail, last_ok = coalesce(excluded.last_ok, last_ok), "
                "last_attempt = excluded.last_attempt, next_attempt = excluded.next_attempt, "
                "bytes_sent = bytes_sent + excluded.bytes_sent, "
                "rate_bps = CASE WHEN excluded.rate_bps > 0 THEN excluded.rate_bps "
                "ELSE rate_bps END",
                (
                    destination,
                    state,
                    detail[:500],
                    now if ok else None,
                    now,
                    next_attempt,
                    sent,
                    rate_bps or 0.0,
                ),
            )
