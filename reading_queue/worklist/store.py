"""The worklist's storage layer: errors, row <-> engine conversions, and the base every
part of the worklist builds on (sessions, state transitions, the event log)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from reading_queue import QueueError
from reading_queue.models import (
    Assignment,
    Station,
    Study,
    WorklistEvent,
)
from reading_queue.worklist.engine import (
    FAIRNESS_WINDOW_S,
    HELD,
    Decision,
    QueuedStudy,
    Reader,
    StudyState,
    remaining_rvu,
)
from reading_queue.worklist.policy import QueuePolicy
from reading_queue.worklist.roster import (
    PacsDestination,
    RadiologistSpec,
    ShiftSpec,
    StationSpec,
)
from telerad.core.priority import Priority

logger = logging.getLogger(__name__)


S = StudyState
_HELD = [s.value for s in HELD]
_OPEN_FOR_ENGINE = [S.READY.value, *_HELD]
_CANCELLABLE = [S.RECEIVED.value, S.READY.value, *_HELD, S.PRELIMINARY.value]
_RECENT_WORK_S = FAIRNESS_WINDOW_S  # RVU read in the fairness window
#: a PostgreSQL claim offers this many of the engine's choices, best first, and takes the
#: first one no other claimer holds (racing claimers all want the head of the queue)
_CLAIM_CHOICES = 4


class StaleState(QueueError):
    """A transition found the study in another state than expected (someone was faster)."""


class UnknownStudy(QueueError):
    pass


class UnknownRadiologist(QueueError):
    pass


class NotEligible(QueueError):
    pass


@dataclass
class RoundResult:
    assigned: int = 0
    reassigned: int = 0
    released: int = 0
    escalated: int = 0
    decisions: list[Decision] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReaderStatus:
    spec: RadiologistSpec
    on_shift: bool
    on_call: bool
    shift_ends_at: float | None
    open_count: int
    open_rvu: float


HeaderReader = Callable[[str], Dataset | None]


def patient_key(patient_id: str, issuer: str = "") -> str:
    """What the engine sees of a patient: a hash, so it can match studies but never log PHI."""
    if not patient_id.strip():
        return ""
    return hashlib.sha256(f"{issuer.strip()}|{patient_id.strip()}".encode()).hexdigest()


def _end_reason(decision: Decision) -> str:
    why = decision.reasons[0] if decision.reasons else ""
    for marker, reason in (
        ("lease expired", "lease_expired"),
        ("shift ended", "shift_end"),
        ("no longer eligible", "ineligible"),
        ("deactivated", "deactivated"),
        ("capacity", "capacity"),
        ("unknown", "unknown_reader"),
        ("makes room", "room_for_stat"),
    ):
        if marker in why:
            return reason
    return "released"


class WorklistStore:
    """Sessions, the event log and state transitions every other part uses."""

    def __init__(
        self,
        engine: Engine,
        policy: QueuePolicy | None = None,
        *,
        webhook_urls: Sequence[str] = (),
        stat_webhook_urls: Sequence[str] = (),
        header_reader: HeaderReader | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.policy = policy or QueuePolicy()
        #: escalations go here
        self.webhook_urls = list(webhook_urls)
        #: every STAT handed to a reader (by a round or an admin) goes here: a pager or the
        #: viewer, so that the reader knows now -- and sets their case aside when told to
        self.stat_webhook_urls = list(stat_webhook_urls)
        self.header_reader = header_reader
        self.clock = clock
        self.session: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
        #: for queries: no write lock on SQLite
        self.read: sessionmaker[Session] = sessionmaker(
            engine.execution_options(read_only=True), expire_on_commit=False
        )
        #: per reader: (row updated_at, profile, the claim module's query parameters)
        self._spec_cache: dict[str, tuple[float, RadiologistSpec, dict[str, Any]]] = {}
        self._claim_engine: Engine | None = None

    def _event(
        self,
        s: Session,
        uid: str,
        kind: str,
        from_state: str,
        to_state: str,
        radiologist: str,
        actor: str,
        detail: dict[str, Any],
        now: float,
    ) -> int:
        res = s.execute(
            insert(WorklistEvent)
            .values(
                study_uid=uid,
                kind=kind,
                from_state=str(from_state),
                to_state=str(to_state),
                radiologist=radiologist,
                actor=actor,
                detail=detail,
                at=now,
            )
            .returning(WorklistEvent.id)
        )
        return int(res.scalar_one())

    def _transition(
        self,
        s: Session,
        uid: str,
        expected: Sequence[StudyState],
        to: StudyState,
        *,
        kind: str,
        actor: str,
        now: float,
        assignee: str | None = None,
        where_assignee: str | None = None,
        values: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> str:
        """``UPDATE ... WHERE state IN :expected`` (and assignee); raise if nothing changed.
        Returns the state the study was in."""
        conds = [Study.study_uid == uid, Study.state.in_([e.value for e in expected])]
        if where_assignee is not None:
            conds.append(Study.assignee == where_assignee)
        vals: dict[str, Any] = {"state": to.value, "version": Study.version + 1, "updated_at": now}
        vals.update(values or {})
        res = s.execute(update(Study).where(*conds).values(**vals).returning(Study.version))
        if res.first() is None:
            current = s.execute(
                select(Study.state, Study.assignee).where(Study.study_uid == uid)
            ).first()
            if current is None:
                raise UnknownStudy(f"no study {uid} on the worklist")
            who = f" (held by {current.assignee})" if current.assignee else ""
            want = "/".join(e.value for e in expected)
            mine = f" held by {where_assignee}" if where_assignee else ""
            raise StaleState(
                f"study {uid} is {current.state}{who}, expected {want}{mine}: "
                f"cannot record {kind!r}"
            )
        from_state = "|".join(e.value for e in expected)
        radiologist = assignee if assignee is not None else (where_assignee or "")
        self._event(s, uid, kind, from_state, to, radiologist, actor, detail or {}, now)
        return from_state

    def _state_of(self, s: Session, uid: str, *, lock: bool = True) -> Study:
        study = s.get(Study, uid, with_for_update=lock)
        if study is None:
            raise UnknownStudy(f"no study {uid} on the worklist")
        return study

    def _open_assignment(
        self, s: Session, uid: str, radiologist: str, mode: str, reasons: Iterable[str], now: float
    ) -> None:
        s.execute(
            insert(Assignment).values(
                study_uid=uid,
                radiologist=radiologist,
                mode=mode,
                reasons=list(reasons),
                assigned_at=now,
                end_reason="",
            )
        )

    def _close_assignment(self, s: Session, uid: str, reason: str, now: float) -> None:
        s.execute(
            update(Assignment)
            .where(Assignment.study_uid == uid, Assignment.ended_at.is_(None))
            .values(ended_at=now, end_reason=reason)
        )


# -- row <-> engine data -----------------------------------------------------------------

_STATE = {st.value: st for st in StudyState}
_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_EVENTS: Table = WorklistEvent.__table__  # type: ignore[assignment]
_ASSIGNMENTS: Table = Assignment.__table__  # type: ignore[assignment]


_QUEUED_COLUMNS = (
    Study.study_uid,
    Study.priority,
    Study.modality,
    Study.received_at,
    Study.deadline,
    Study.rvu,
    Study.jurisdiction,
    Study.language,
    Study.subspecialty,
    Study.station,
    Study.patient_key,
    Study.state,
    Study.assignee,
    Study.lease_expires_at,
    Study.escalated_at,
    Study.started_at,
)


def _pull_reader(spec: RadiologistSpec, held: Sequence[Any], now: float) -> Reader | None:
    """The engine's view of a reader who asks for work, from (priority, rvu, state,
    started_at) of what they hold; None when they are at capacity."""
    if len(held) >= spec.max_concurrent:
        return None
    open_rvu = [0.0, 0.0, 0.0]
    in_progress = in_progress_stat = 0.0
    for p, r, state, started in held:
        if state == S.IN_PROGRESS:
            left = remaining_rvu(float(r), started, now, spec.rvu_per_hour)
            in_progress += left
            if int(p) == Priority.STAT:
                in_progress_stat += left
        else:
            open_rvu[int(p)] += float(r)
    return spec.reader(
        open_count=len(held),
        open_rvu=(open_rvu[0], open_rvu[1], open_rvu[2]),
        in_progress_rvu=in_progress,
        in_progress_stat_rvu=in_progress_stat,
        # no fairness term in a pull: the reader asked for work for themselves
    )


def _excluding(row: Any, key: str) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """Station preferences of a PostgreSQL claim candidate: only whether the station
    excludes the claiming reader (a pull has no use for the preferred list)."""
    return {row.station: (frozenset(), frozenset([key]) if row.excludes_reader else frozenset())}


def _queued(row: Any, stations: dict[str, tuple[frozenset[str], frozenset[str]]]) -> QueuedStudy:
    preferred, excluded = stations.get(row.station, (frozenset(), frozenset()))
    return QueuedStudy(
        uid=row.study_uid,
        priority=int(row.priority),
        modality=row.modality,
        received_at=float(row.received_at),
        deadline=float(row.deadline),
        rvu=float(row.rvu),
        jurisdiction=row.jurisdiction,
        language=row.language,
        subspecialty=row.subspecialty,
        station=row.station,
        patient_key=row.patient_key,
        preferred=preferred,
        excluded=excluded,
        state=_STATE[row.state],
        assignee=row.assignee,
        lease_expires_at=row.lease_expires_at,
        escalated=row.escalated_at is not None,
        started_at=row.started_at,
    )


# Statements of the claim path, built once (building them costs more than running them).
_ASSIGN_READY = (
    update(_STUDIES)
    .where(_STUDIES.c.study_uid == bindparam("b_uid"), _STUDIES.c.state == S.READY.value)
    .values(
        state=S.ASSIGNED.value,
        assignee=bindparam("b_who"),
        assigned_at=bindparam("b_now"),
        lease_expires_at=bindparam("b_lease"),
        version=_STUDIES.c.version + 1,
        updated_at=bindparam("b_now"),
    )
)
_INSERT_EVENT = insert(_EVENTS)
_INSERT_ASSIGNMENT = insert(_ASSIGNMENTS)


def _station_prefs(
    s: Session, names: set[str] | None = None
) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    q = select(Station.name, Station.preferred, Station.excluded)
    if names is not None:
        q = q.where(Station.name.in_(sorted(names)))
    return {
        name: (frozenset(pref or ()), frozenset(excl or ())) for name, pref, excl in s.execute(q)
    }


def _with_loads(
    specs: Sequence[RadiologistSpec],
    studies: Sequence[QueuedStudy],
    recent: dict[str, float],
    now: float,
) -> list[Reader]:
    rates = {spec.key: spec.rvu_per_hour for spec in specs}
    counts: dict[str, int] = {}
    rvus: dict[str, list[float]] = {}
    in_progress: dict[str, float] = {}
    in_progress_stat: dict[str, float] = {}
    for st in studies:
        who = st.assignee
        if st.state not in HELD or not who:
            continue
        counts[who] = counts.get(who, 0) + 1
        if st.state == StudyState.IN_PROGRESS:
            left = remaining_rvu(st.rvu, st.started_at, now, rates.get(who, 8.0))
            in_progress[who] = in_progress.get(who, 0.0) + left
            if st.priority == Priority.STAT:
                in_progress_stat[who] = in_progress_stat.get(who, 0.0) + left
        else:
            rvus.setdefault(who, [0.0, 0.0, 0.0])[st.priority] += st.rvu
    out = []
    for spec in specs:
        r = rvus.get(spec.key, [0.0, 0.0, 0.0])
        out.append(
            spec.reader(
                open_count=counts.get(spec.key, 0),
                open_rvu=(r[0], r[1], r[2]),
                in_progress_rvu=in_progress.get(spec.key, 0.0),
                in_progress_stat_rvu=in_progress_stat.get(spec.key, 0.0),
                recent_rvu=recent.get(spec.key, 0.0),
            )
        )
    return out


def _radiologist_values(spec: RadiologistSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "modalities": spec.modalities,
        "subspecialties": spec.subspecialties,
        "licences": spec.licences,
        "languages": spec.languages,
        "timezone": spec.timezone,
        "shifts": [sh.model_dump() for sh in spec.shifts],
        "max_concurrent": spec.max_concurrent,
        "rvu_per_hour": spec.rvu_per_hour,
        "active": spec.active,
    }


def _spec(row: Any) -> RadiologistSpec:
    """From an ORM ``Radiologist`` or a Core row of the table."""
    return RadiologistSpec(
        key=row.key,
        name=row.name,
        modalities=list(row.modalities),
        subspecialties=list(row.subspecialties),
        licences=list(row.licences),
        languages=list(row.languages),
        timezone=row.timezone,
        shifts=[ShiftSpec.model_validate(sh) for sh in row.shifts],
        max_concurrent=row.max_concurrent,
        rvu_per_hour=row.rvu_per_hour,
        active=row.active,
    )


def _station_values(spec: StationSpec) -> dict[str, Any]:
    return {
        "institution": spec.institution,
        "jurisdiction": spec.jurisdiction,
        "language": spec.language,
        "preferred": list(spec.preferred),
        "excluded": list(spec.excluded),
        "sla_minutes": dict(spec.sla_minutes),
        "pacs": [p.model_dump() for p in spec.pacs],
    }


def _station_spec(row: Station) -> StationSpec:
    return StationSpec(
        name=row.name,
        institution=row.institution,
        jurisdiction=row.jurisdiction,
        language=row.language,
        preferred=list(row.preferred or []),
        excluded=list(row.excluded or []),
        sla_minutes=dict(row.sla_minutes or {}),
        pacs=[PacsDestination.model_validate(p) for p in row.pacs or []],
    )


def _hdr(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword, "")
    return str(value or "").strip()
