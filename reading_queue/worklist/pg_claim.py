"""Pull claims on PostgreSQL in two round trips.

A claim is a short conversation: lock the reader's row, read what they hold and the first
page of candidate studies, let the engine choose, then take the chosen study and record
the assignment. As separate statements that is nine round trips (BEGIN, six statements,
a second page now and then, COMMIT); through psycopg's pipeline mode it is two:

1. ``BEGIN; lock the reader; their held studies; candidates``. The server still runs them
   one after the other, each with its own snapshot taken when it starts, so the held
   studies are read *after* the reader's lock is granted. (One statement that locked the
   reader and joined their studies would not do: a statement that waited for the lock
   sees the other tables as they were before the claim that held it, and would over-fill
   the reader -- the 8-worker test caught exactly that.)
2. ``take a study and write the event and the assignment; COMMIT``: one statement with
   data-modifying CTEs. It gets the engine's first few choices, best first, and takes the
   first that is still ``ready`` and not locked by another claimer (``FOR UPDATE SKIP
   LOCKED``): claimers racing for the head of the queue each get the next one instead of
   waiting or starting over. When all are gone nothing is written, the empty transaction
   commits, and the caller looks again without them.

The candidate query is one text for every reader (their profile goes in as arrays), so
psycopg prepares it once per connection. The engine still decides; SQL only pre-filters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import Connection as PgConnection
from psycopg.rows import namedtuple_row
from psycopg.types.json import Json
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from reading_queue.worklist.engine import HELD
from reading_queue.worklist.roster import RadiologistSpec

logger = logging.getLogger(__name__)

#: rows per candidate page
PAGE = 16
#: the states in which a study counts against its reader
_HELD_STATES = [s.value for s in HELD]

LOCK_READER = "SELECT id, updated_at FROM radiologists WHERE key = %(key)s FOR UPDATE"

HELD_BY = (
    "SELECT priority, rvu, state, started_at FROM studies"
    " WHERE assignee = %(key)s AND state = ANY(%(held)s)"
)

_CANDIDATE_COLUMNS = (
    "s.study_uid, s.priority, s.modality, s.received_at, s.deadline, s.rvu, s.jurisdiction,"
    " s.language, s.subspecialty, s.station, s.patient_key, s.state, s.assignee,"
    " s.lease_expires_at, s.escalated_at, s.started_at,"
    # whether the station excludes this reader: a flag, not the station's lists (parsing
    # them for every candidate was a fifth of a claim's time); the engine still decides
    " COALESCE(jsonb_exists(st.excluded::jsonb, %(key)s), false) AS excludes_reader"
)
_CANDIDATE_FILTER = (
    " FROM studies s LEFT OUTER JOIN stations st ON st.name = s.station"
    " WHERE s.state = 'ready'"
    " AND s.modality = ANY(%(modalities)s)"
    # no jurisdiction: readable by no one until an admin sets it (needs jurisdiction)
    " AND (s.jurisdiction = ANY(%(licences)s)"
    " OR s.jurisdiction LIKE ANY(%(licence_prefixes)s))"
    " AND (cardinality(%(languages)s::text[]) = 0 OR s.language = ''"
    " OR s.language = ANY(%(languages)s))"
    " AND s.subspecialty = ANY(%(subspecialties)s)"
)
CANDIDATES = (
    f"SELECT {_CANDIDATE_COLUMNS}{_CANDIDATE_FILTER} ORDER BY s.deadline, s.study_uid LIMIT {PAGE}"
)
CANDIDATES_AFTER = (
    f"SELECT {_CANDIDATE_COLUMNS}{_CANDIDATE_FILTER}"
    " AND (s.deadline > %(after_deadline)s"
    " OR (s.deadline = %(after_deadline)s AND s.study_uid > %(after_uid)s))"
    f" ORDER BY s.deadline, s.study_uid LIMIT {PAGE}"
)

TAKE = """
WITH picked AS (
    SELECT s.study_uid, c.lease, c.reasons
    FROM unnest(%(uids)s::text[], %(leases)s::float8[], %(reasons)s::json[])
        WITH ORDINALITY AS c(uid, lease, reasons, rank)
    JOIN studies s ON s.study_uid = c.uid
    WHERE s.state = 'ready'
    ORDER BY c.rank
    LIMIT 1
    FOR UPDATE OF s SKIP LOCKED
), moved AS (
    UPDATE studies SET state = 'assigned', assignee = %(who)s, assigned_at = %(now)s,
        lease_expires_at = picked.lease, version = studies.version + 1, updated_at = %(now)s
    FROM picked
    WHERE studies.study_uid = picked.study_uid AND studies.state = 'ready'
    RETURNING studies.study_uid, picked.reasons
), event AS (
    INSERT INTO worklist_events (study_uid, kind, from_state, to_state, radiologist, actor,
        detail, at)
    SELECT study_uid, 'assigned', 'ready', 'assigned', %(who)s, %(actor)s,
        json_build_object('mode', 'pull', 'reasons', reasons), %(now)s
    FROM moved
), assignment AS (
    INSERT INTO assignments (study_uid, radiologist, mode, reasons, assigned_at,
        started_at, ended_at, end_reason)
    SELECT study_uid, %(who)s, 'pull', reasons, %(now)s, NULL, NULL, ''
    FROM moved
)
SELECT study_uid FROM moved
"""


def profile_params(spec: RadiologistSpec) -> dict[str, Any]:
    """The candidate query's parameters for a reader: a coarse pre-filter (the engine
    checks everything again)."""
    return {
        "key": spec.key,
        "modalities": list(spec.modalities),
        "licences": list(spec.licences),
        "licence_prefixes": [f"{lic}-%" for lic in spec.licences],
        "languages": list(spec.languages),
        "subspecialties": ["", *spec.subspecialties],
    }


def claim_engine(engine: Engine) -> Engine:
    """The pool claims use: the hub's database without a ping before every checkout (a
    round trip, a tenth of a claim). A connection found dead is replaced and the claim's
    first round trip sent again, which is safe: nothing has been written by then."""
    return create_engine(engine.url, pool_pre_ping=False, pool_size=2, max_overflow=6)


class ClaimConversation:
    """One claim transaction on a pooled connection, in autocommit mode with explicit
    ``BEGIN``/``COMMIT`` so both can ride in a pipeline. Use as a context manager: on the
    way out an unfinished transaction is rolled back and the connection goes back to the
    pool as it came."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connect()

    def _connect(self) -> None:
        self._raw = self._engine.raw_connection()
        self.pg: PgConnection[Any] = self._raw.driver_connection  # type: ignore[assignment]
        self.pg.autocommit = True

    def __enter__(self) -> ClaimConversation:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if not self.pg.closed and self.pg.info.transaction_status != 0:  # not IDLE
                self.pg.execute("ROLLBACK")
            if not self.pg.closed:
                self.pg.autocommit = False
        except Exception:
            self._raw.invalidate()
            raise
        finally:
            self._raw.close()

    def open(
        self, key: str, profile: dict[str, Any] | None
    ) -> tuple[Any, list[Any], list[Any] | None]:
        """``BEGIN``, lock the reader, read their holdings and (given their profile) the
        first candidate page: one round trip. Returns (reader row or None, held, page)."""
        try:
            return self._open(key, profile)
        except psycopg.OperationalError:
            if not (self.pg.closed or self.pg.broken):
                raise
            # the server restarted or dropped us since this connection was last used
            logger.warning("claim: database connection lost, reconnecting")
            self._raw.invalidate()
            self._connect()
            return self._open(key, profile)

    def _open(
        self, key: str, profile: dict[str, Any] | None
    ) -> tuple[Any, list[Any], list[Any] | None]:
        pg = self.pg
        with pg.pipeline():
            pg.execute("BEGIN")
            lock = pg.execute(LOCK_READER, {"key": key}, prepare=True)
            held = pg.execute(HELD_BY, {"key": key, "held": _HELD_STATES}, prepare=True)
            page = None
            if profile is not None:
                page = pg.cursor(row_factory=namedtuple_row)
                page.execute(CANDIDATES, profile, prepare=True)
        row = lock.fetchone()
        return row, held.fetchall(), (page.fetchall() if page is not None else None)

    def radiologist(self, row_id: int) -> Any:
        """The reader's whole row (when their profile changed since it was cached)."""
        cur = self.pg.cursor(row_factory=namedtuple_row)
        cur.execute("SELECT * FROM radiologists WHERE id = %(id)s", {"id": row_id})
        return cur.fetchone()

    def page(self, profile: dict[str, Any], after: tuple[float, str] | None) -> list[Any]:
        cur = self.pg.cursor(row_factory=namedtuple_row)
        if after is None:
            cur.execute(CANDIDATES, profile, prepare=True)
        else:
            params = {**profile, "after_deadline": after[0], "after_uid": after[1]}
            cur.execute(CANDIDATES_AFTER, params, prepare=True)
        return cur.fetchall()

    def take_and_commit(
        self,
        choices: Sequence[tuple[str, float | None, Sequence[str]]],
        who: str,
        now: float,
        actor: str,
    ) -> str | None:
        """Take the first of ``choices`` (uid, lease expiry, reasons) that is still ready and
        not held by another claimer, for ``who``, and commit, in one round trip. Returns its
        uid, or None when others hold or took them all (the transaction wrote nothing)."""
        pg = self.pg
        params = {
            "uids": [uid for uid, _, _ in choices],
            "leases": [lease for _, lease, _ in choices],
            "reasons": [Json(list(reasons)) for _, _, reasons in choices],
            "who": who,
            "now": now,
            "actor": actor,
        }
        with pg.pipeline():
            took = pg.execute(TAKE, params, prepare=True)
            pg.execute("COMMIT")
        row = took.fetchone()
        return str(row[0]) if row is not None else None
