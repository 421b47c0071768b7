"""The reading worklist: studies, radiologists and assignments in the database.

One public method per use case, one transaction each. Every state change is
``UPDATE studies ... WHERE study_uid = :uid AND state = :expected`` and raises
``StaleState`` when no row changed, and every change appends to ``worklist_events``.

Concurrency. On PostgreSQL a pull claim locks its reader's row, then takes candidate
studies with ``FOR UPDATE SKIP LOCKED``; a push round locks every reader row (in id order)
and then the held studies, so a round and a claim never hand out the same study or push a
reader past capacity; readers' own actions lock only the study, so lock order (readers,
then studies) rules out deadlocks. On SQLite every transaction is
``BEGIN IMMEDIATE`` (see models.make_engine): writers are serialised.

The decisions themselves come from the pure ``engine``; this module only loads its input
and applies its output.
"""

from __future__ import annotations

from reading_queue.worklist.admin import AdminMixin
from reading_queue.worklist.claims import ClaimsMixin
from reading_queue.worklist.intake import IntakeMixin
from reading_queue.worklist.queries import QueriesMixin
from reading_queue.worklist.reading import ReadingMixin
from reading_queue.worklist.roster_store import RosterMixin
from reading_queue.worklist.rounds import RoundsMixin
from reading_queue.worklist.store import (
    NotEligible,
    ReaderStatus,
    RoundResult,
    StaleState,
    UnknownRadiologist,
    UnknownStudy,
    WorklistStore,
    patient_key,
)

__all__ = [
    "NotEligible",
    "ReaderStatus",
    "RoundResult",
    "StaleState",
    "UnknownRadiologist",
    "UnknownStudy",
    "Worklist",
    "WorklistStore",
    "patient_key",
]


class Worklist(
    RosterMixin,
    IntakeMixin,
    RoundsMixin,
    ClaimsMixin,
    ReadingMixin,
    AdminMixin,
    QueriesMixin,
):
    """The reading worklist; each use case lives in the part named after it (``roster_store``,
    ``intake``, ``rounds``, ``claims``, ``reading``, ``admin``, ``webhooks``, ``queries``),
    all on ``store.WorklistStore``."""
