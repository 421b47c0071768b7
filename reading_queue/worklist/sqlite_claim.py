"""Pull claims on SQLite: the same conversation as ``pg_claim``, on the raw connection.

SQLite runs in our process, so a "round trip" is a function call; what a claim costs there
is SQLAlchemy's per-statement work (a few hundred microseconds each, more than SQLite's)
and the commit. Here the statements run on the pool's ``sqlite3`` connection:

1. ``BEGIN IMMEDIATE`` takes the database's write lock up front (as every hub transaction
   on SQLite does, see ``models.make_engine``): claims are serialised, so what we read is
   what we write against -- no row locks, nothing to skip.
2. Read the reader's row, what they hold and a page of candidates (one text for every
   reader: the profile goes in as JSON arrays read with ``json_each``).
   The indexes are named (``INDEXED BY``): SQLite plans from the statistics of the last
   ``ANALYZE``, and one taken when nobody held anything would have it scan every study.
3. Take the engine's first choice (``UPDATE ... WHERE state = 'ready'``, checked), write the
   event and the assignment, ``COMMIT``.
"""

from __future__ import annotations

import json
import sqlite3
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine

from reading_queue.worklist.engine import HELD
from reading_queue.worklist.roster import RadiologistSpec

#: rows per candidate page
PAGE = 16

_READER = "SELECT id, updated_at FROM radiologists WHERE key = :key"
#: the states in which a study counts against its reader (engine constants, not input)
_HELD_STATES = ", ".join(f"'{s.value}'" for s in HELD)
_HELD_BY = (
    "SELECT priority, rvu, state, started_at FROM studies INDEXED BY ix_studies_assignee_state"
    f" WHERE assignee = :key AND state IN ({_HELD_STATES})"
)
_CANDIDATES_BASE = (
    "SELECT s.study_uid, s.priority, s.modality, s.received_at, s.deadline, s.rvu,"
    " s.jurisdiction, s.language, s.subspecialty, s.station, s.patient_key, s.state,"
    " s.assignee, s.lease_expires_at, s.escalated_at, s.started_at,"
    " EXISTS (SELECT 1 FROM json_each(st.excluded) WHERE value = :key) AS excludes_reader"
    " FROM studies s INDEXED BY ix_studies_state_deadline"
    " LEFT OUTER JOIN stations st ON st.name = s.station"
    " WHERE s.state = 'ready'"
    " AND s.modality IN (SELECT value FROM json_each(:modalities))"
    # no jurisdiction: readable by no one until an admin sets it (needs jurisdiction)
    " AND s.jurisdiction != '' AND EXISTS (SELECT 1 FROM json_each(:licences)"
    " WHERE s.jurisdiction = value OR s.jurisdiction LIKE value || '-%')"
    " AND (:any_language OR s.language = ''"
    " OR s.language IN (SELECT value FROM json_each(:languages)))"
    " AND s.subspecialty IN (SELECT value FROM json_each(:subspecialties))"
)
_CANDIDATES = f"{_CANDIDATES_BASE} ORDER BY s.deadline, s.study_uid LIMIT {PAGE}"
_CANDIDATES_AFTER = (
    f"{_CANDIDATES_BASE} AND (s.deadline > :after_deadline"
    " OR (s.deadline = :after_deadline AND s.study_uid > :after_uid))"
    f" ORDER BY s.deadline, s.study_uid LIMIT {PAGE}"
)
_TAKE = (
    "UPDATE studies SET state = 'assigned', assignee = :who, assigned_at = :now,"
    " lease_expires_at = :lease, version = version + 1, updated_at = :now"
    " WHERE study_uid = :uid AND state = 'ready'"
)
_EVENT = (
    "INSERT INTO worklist_events (study_uid, kind, from_state, to_state, radiologist, actor,"
    " detail, at) VALUES (:uid, 'assigned', 'ready', 'assigned', :who, :actor, :detail, :now)"
)
_ASSIGNMENT = (
    "INSERT INTO assignments (study_uid, radiologist, mode, reasons, assigned_at, started_at,"
    " ended_at, end_reason) VALUES (:uid, :who, 'pull', :reasons, :now, NULL, NULL, '')"
)


def claim_engine(engine: Engine) -> Engine:
    return engine


def profile_params(spec: RadiologistSpec) -> dict[str, Any]:
    """The candidate query's parameters for a reader (a superset: the engine decides)."""
    return {
        "key": spec.key,
        "modalities": json.dumps(list(spec.modalities)),
        "licences": json.dumps(list(spec.licences)),
        "any_language": not spec.languages,
        "languages": json.dumps(list(spec.languages)),
        "subspecialties": json.dumps(["", *spec.subspecialties]),
    }


_row_types: dict[tuple[str, ...], Any] = {}


def _named_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> Any:
    names = tuple(d[0] for d in cursor.description)
    cls = _row_types.get(names)
    if cls is None:
        cls = _row_types[names] = namedtuple("Row", names)
    return cls(*values)


class ClaimConversation:
    """One claim transaction on a pooled ``sqlite3`` connection (context manager: an
    unfinished transaction is rolled back on the way out)."""

    def __init__(self, engine: Engine) -> None:
        self._raw = engine.raw_connection()
        self.db: sqlite3.Connection = self._raw.driver_connection  # type: ignore[assignment]

    def __enter__(self) -> ClaimConversation:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except Exception:
            self._raw.invalidate()
            raise
        finally:
            self._raw.close()

    def _rows(self, sql: str, params: dict[str, Any]) -> list[Any]:
        cur = self.db.cursor()
        cur.row_factory = _named_row
        return cur.execute(sql, params).fetchall()

    def open(
        self, key: str, profile: dict[str, Any] | None
    ) -> tuple[Any, list[Any], list[Any] | None]:
        """Take the write lock, read the reader's row, their holdings and (given their
        profile) the first candidate page."""
        self.db.execute("BEGIN IMMEDIATE")
        row = self.db.execute(_READER, {"key": key}).fetchone()
        held = self.db.execute(_HELD_BY, {"key": key})
        page = self._rows(_CANDIDATES, profile) if profile is not None and row else None
        return row, held.fetchall(), page

    def radiologist(self, row_id: int) -> Any:
        """The reader's whole row, JSON columns parsed (their profile changed)."""
        (row,) = self._rows("SELECT * FROM radiologists WHERE id = :id", {"id": row_id})
        return row._replace(
            **{
                k: json.loads(getattr(row, k))
                for k in ("modalities", "subspecialties", "licences", "languages", "shifts")
            }
        )

    def page(self, profile: dict[str, Any], after: tuple[float, str] | None) -> list[Any]:
        if after is None:
            return self._rows(_CANDIDATES, profile)
        params = {**profile, "after_deadline": after[0], "after_uid": after[1]}
        return self._rows(_CANDIDATES_AFTER, params)

    def take_and_commit(
        self,
        choices: Sequence[tuple[str, float | None, Sequence[str]]],
        who: str,
        now: float,
        actor: str,
    ) -> str | None:
        """Take the first of ``choices`` (uid, lease expiry, reasons) still ready for ``who``,
        record it and commit. Returns its uid (None: none was ready, nothing written)."""
        for uid, lease, reasons in choices:
            params = {"uid": uid, "who": who, "now": now, "lease": lease}
            if self.db.execute(_TAKE, params).rowcount != 1:
                continue  # cannot happen under the write lock; checked all the same
            detail = json.dumps({"mode": "pull", "reasons": list(reasons)})
            self.db.execute(_EVENT, {**params, "actor": actor, "detail": detail})
            self.db.execute(_ASSIGNMENT, {**params, "reasons": json.dumps(list(reasons))})
            self.db.execute("COMMIT")
            return uid
        self.db.execute("COMMIT")
        return None
