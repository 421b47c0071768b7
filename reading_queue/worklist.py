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

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydicom.dataset import Dataset
from sqlalchemy import Table, bindparam, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from reading_queue import QueueError
from reading_queue.engine import (
    FAIRNESS_WINDOW_S,
    HELD,
    Decision,
    DecisionKind,
    QueuedStudy,
    Reader,
    StudyState,
    ineligibility,
    plan,
    pull_choices,
    remaining_rvu,
    shift_status,
)
from reading_queue.ingest import hash_token
from reading_queue.models import (
    Assignment,
    HubStudy,
    Radiologist,
    Station,
    Study,
    StudyEvent,
    WebhookDelivery,
    WorklistEvent,
)
from reading_queue.policy import QueuePolicy
from reading_queue.roster import (
    PacsDestination,
    RadiologistSpec,
    Roster,
    RosterError,
    ShiftSpec,
    StationSpec,
)
from telerad.config import Priority

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


class Worklist:
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

    # -- roster ----------------------------------------------------------------------------

    def upsert_radiologist(self, spec: RadiologistSpec) -> bool:
        """Create or update a radiologist; True when created. A lower capacity or a deactivation
        takes effect at the next round (not-started studies go back to the pool)."""
        with self.session.begin() as s:
            return self._upsert_radiologist(s, spec, self.clock())

    def _upsert_radiologist(self, s: Session, spec: RadiologistSpec, now: float) -> bool:
        values = _radiologist_values(spec)
        row = s.scalar(select(Radiologist).where(Radiologist.key == spec.key))
        if row is None:
            s.add(Radiologist(key=spec.key, created_at=now, updated_at=now, **values))
            created = True
        else:
            changed = any(getattr(row, k) != v for k, v in values.items())
            for k, v in values.items():
                setattr(row, k, v)
            if changed:
                row.updated_at = max(now, row.updated_at + 1e-6)  # claims cache by this
            created = False
        logger.info("radiologist %s %s", spec.key, "added" if created else "updated")
        return created

    def set_radiologist_active(self, key: str, active: bool) -> None:
        with self.session.begin() as s:
            res = s.execute(
                update(Radiologist)
                .where(Radiologist.key == key)
                .values(active=active, updated_at=self.clock())
            )
            if not res.rowcount:  # type: ignore[attr-defined]
                raise UnknownRadiologist(f"no radiologist {key!r}")

    def radiologist(self, key: str) -> RadiologistSpec:
        with self.read() as s:
            row = s.scalar(select(Radiologist).where(Radiologist.key == key))
            if row is None:
                raise UnknownRadiologist(f"no radiologist {key!r}")
            return _spec(row)

    def radiologists(self) -> list[RadiologistSpec]:
        with self.read() as s:
            return [_spec(r) for r in s.scalars(select(Radiologist).order_by(Radiologist.key))]

    def roster_status(self, now: float | None = None) -> list[ReaderStatus]:
        now = self.clock() if now is None else now
        with self.read() as s:
            specs = [_spec(r) for r in s.scalars(select(Radiologist).order_by(Radiologist.key))]
            loads = {
                key: (int(n), float(rvu or 0.0))
                for key, n, rvu in s.execute(
                    select(Study.assignee, func.count(), func.sum(Study.rvu))
                    .where(Study.state.in_(_HELD))
                    .group_by(Study.assignee)
                )
            }
        out = []
        for spec in specs:
            status = shift_status(spec.reader(), now)
            n, rvu = loads.get(spec.key, (0, 0.0))
            out.append(ReaderStatus(spec, status.on_shift, status.on_call, status.ends_at, n, rvu))
        return out

    def configure_station(self, spec: StationSpec) -> str | None:
        """Create or update a station's reading profile; returns a new station's upload token
        (shown once), None for an existing station (its token is kept)."""
        with self.session.begin() as s:
            return self._configure_station(s, spec)

    def _configure_station(self, s: Session, spec: StationSpec) -> str | None:
        values = _station_values(spec)
        row = s.scalar(select(Station).where(Station.name == spec.name))
        if row is not None:
            for k, v in values.items():
                setattr(row, k, v)
            return None
        token = secrets.token_urlsafe(32)
        s.add(
            Station(
                name=spec.name, token_sha256=hash_token(token), created_at=self.clock(), **values
            )
        )
        return token

    def station(self, name: str) -> StationSpec:
        with self.read() as s:
            row = s.scalar(select(Station).where(Station.name == name))
            if row is None:
                raise QueueError(f"no station {name!r}")
            return _station_spec(row)

    def stations(self) -> list[StationSpec]:
        with self.read() as s:
            return [_station_spec(r) for r in s.scalars(select(Station).order_by(Station.name))]

    def load_roster(self, roster: Roster) -> dict[str, str]:
        """Seed or update radiologists and stations, all or nothing; returns the upload tokens
        of newly created stations. Stations may name radiologists of the file or of the hub."""
        tokens: dict[str, str] = {}
        now = self.clock()
        with self.session.begin() as s:
            known = set(s.scalars(select(Radiologist.key))) | {r.key for r in roster.radiologists}
            for st in roster.stations:
                unknown = sorted(set(st.preferred + st.excluded) - known)
                if unknown:
                    raise RosterError(f"station {st.name} names unknown radiologists {unknown}")
            for spec in roster.radiologists:
                self._upsert_radiologist(s, spec, now)
            for st in roster.stations:
                token = self._configure_station(s, st)
                if token is not None:
                    tokens[st.name] = token
        return tokens

    def has_roster(self) -> bool:
        with self.read() as s:
            return s.scalar(select(func.count()).select_from(Radiologist)) != 0

    # -- intake ----------------------------------------------------------------------------

    def consume_events(self, limit: int = 500, now: float | None = None) -> int:
        """Turn ``study_received`` events of the ingest outbox into worklist studies."""
        with self.read() as s:
            pending = list(
                s.execute(
                    select(StudyEvent.id, StudyEvent.study_uid)
                    .where(StudyEvent.kind == "study_received", StudyEvent.consumed_at.is_(None))
                    .order_by(StudyEvent.id)
                    .limit(limit)
                )
            )
        if not pending:
            return 0
        # Read headers (archive I/O) before taking the write lock.
        headers: dict[str, Dataset | None] = {}
        if self.header_reader is not None:
            for _, uid in pending:
                if uid not in headers:
                    try:
                        headers[uid] = self.header_reader(uid)
                    except Exception:
                        logger.exception("cannot read a header of study %s", uid)
                        headers[uid] = None
        done = 0
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            events = s.scalars(
                select(StudyEvent)
                .where(StudyEvent.id.in_([p[0] for p in pending]), StudyEvent.consumed_at.is_(None))
                .order_by(StudyEvent.id)
                .with_for_update(skip_locked=True)
            ).all()
            stations = {st.name: st for st in s.scalars(select(Station))}
            for ev in events:
                self._intake(s, ev, headers.get(ev.study_uid), stations, now)
                ev.consumed_at = now
                done += 1
        return done

    def _intake(
        self,
        s: Session,
        ev: StudyEvent,
        header: Dataset | None,
        stations: dict[str, Station],
        now: float,
    ) -> None:
        payload = json.loads(ev.payload or "{}")
        hub = s.get(HubStudy, ev.study_uid)
        existing = s.get(Study, ev.study_uid, with_for_update=True)
        count = int(payload.get("instance_count") or (hub.instance_count if hub else 0))
        if existing is not None:
            new = int(payload.get("new_instances") or 0)
            values: dict[str, Any] = {"instance_count": count, "updated_at": now}
            late = existing.state not in (S.RECEIVED, S.READY)
            if late:
                values["late_instances"] = existing.late_instances + new
            s.execute(update(Study).where(Study.study_uid == ev.study_uid).values(**values))
            if late:
                self._event(
                    s,
                    ev.study_uid,
                    "late_series",
                    existing.state,
                    existing.state,
                    existing.assignee or "",
                    "ingest",
                    {
                        "new_instances": new,
                        "addendum_needed": existing.state in (S.PRELIMINARY, S.FINAL),
                    },
                    now,
                )
            return
        station_name = str(payload.get("station") or (hub.station if hub else ""))
        station = stations.get(station_name)
        modality = (hub.modality if hub else "") or _hdr(header, "Modality")
        body_part = (hub.body_part if hub else "") or _hdr(header, "BodyPartExamined")
        priority = int(payload.get("priority", hub.priority if hub else Priority.ROUTINE))
        subspecialty, rvu = self.policy.classify(modality, body_part)
        received = ev.created_at
        overrides = dict(station.sla_minutes or {}) if station else {}
        deadline = received + self.policy.sla_s(priority, overrides)
        s.add(
            Study(
                study_uid=ev.study_uid,
                accession=_hdr(header, "AccessionNumber")[:64],
                modality=modality.upper()[:16],
                body_part=body_part.upper()[:64],
                description=_hdr(header, "StudyDescription")[:128],
                subspecialty=subspecialty,
                rvu=rvu,
                station=station_name,
                institution=(station.institution if station else "")
                or _hdr(header, "InstitutionName")[:128],
                jurisdiction=station.jurisdiction if station else "",
                language=station.language if station else "",
                priority=priority,
                received_at=received,
                deadline=deadline,
                state=S.RECEIVED.value,
                instance_count=count,
                patient_id=_hdr(header, "PatientID")[:64],
                patient_name=_hdr(header, "PatientName")[:192],
                patient_birth_date=_hdr(header, "PatientBirthDate")[:8],
                patient_key=patient_key(
                    _hdr(header, "PatientID"), _hdr(header, "IssuerOfPatientID")
                ),
                updated_at=now,
            )
        )
        s.flush()
        detail = {"station": station_name, "priority": Priority(priority).label}
        self._event(s, ev.study_uid, "received", "", S.RECEIVED, "", "ingest", detail, now)
        self._transition(
            s,
            ev.study_uid,
            [S.RECEIVED],
            S.READY,
            kind="ready",
            actor="ingest",
            now=now,
            detail={
                "deadline": deadline,
                "rvu": rvu,
                "subspecialty": subspecialty,
                "jurisdiction": station.jurisdiction if station else "",
            },
        )
        logger.info(
            "study %s from %s on the worklist: %s %s, %s",
            ev.study_uid,
            station_name,
            modality,
            Priority(priority).name,
            f"due in {(deadline - now) / 60:.0f} min",
        )

    # -- transitions -----------------------------------------------------------------------

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

    # -- the engine: push rounds and pull claims -------------------------------------------

    def _recent_rvu(self, s: Session, now: float, key: str | None = None) -> dict[str, float]:
        q = (
            select(Study.assignee, func.sum(Study.rvu))
            .where(
                Study.reported_at.is_not(None),
                Study.reported_at > now - _RECENT_WORK_S,
                Study.assignee.is_not(None),
            )
            .group_by(Study.assignee)
        )
        if key is not None:
            q = q.where(Study.assignee == key)
        return {str(k): float(v or 0.0) for k, v in s.execute(q)}

    def _sticky(self, s: Session, now: float) -> dict[str, str]:
        """patient key -> reader of their open or most recent study (for studies waiting)."""
        keys = sorted(
            set(
                s.scalars(
                    select(Study.patient_key).where(
                        Study.state == S.READY.value, Study.patient_key != ""
                    )
                )
            )
        )
        cutoff = now - self.policy.sticky_days * 86400.0
        out: dict[str, tuple[float, str]] = {}
        for i in range(0, len(keys), 500):
            rows = s.execute(
                select(Study.patient_key, Study.assignee, Study.assigned_at).where(
                    Study.patient_key.in_(keys[i : i + 500]),
                    Study.assignee.is_not(None),
                    or_(Study.state.in_(_HELD), Study.reported_at > cutoff),
                )
            )
            for pk, who, at in rows:
                if pk not in out or (at or 0.0) > out[pk][0]:  # the latest wins
                    out[pk] = (at or 0.0, str(who))
        return {pk: who for pk, (_, who) in out.items()}

    def run_round(
        self, now: float | None = None, *, explain: bool = False, assign: bool = True
    ) -> RoundResult:
        """One round: apply the engine's plan for every open study (``assign=False``: pull
        mode, only releases and escalations).

        Every reader row is locked for the round (pull claims and manual assignments lock
        their reader's row too, so none runs meanwhile), then the held studies (a reader who
        opens or reports one waits for the round). What can still race -- an admin
        cancelling a ready study -- makes one guarded UPDATE match nothing: the round rolls
        back and is planned again."""
        for attempt in range(3):
            try:
                return self._round(now, explain, assign)
            except StaleState as exc:
                if attempt == 2:
                    raise
                logger.info("round raced with a reader (%s); planning again", exc)
        raise AssertionError("unreachable")

    def _round(self, at: float | None, explain: bool, assign: bool) -> RoundResult:
        with self.session.begin() as s:
            rows = s.scalars(select(Radiologist).order_by(Radiologist.id).with_for_update()).all()
            specs = [_spec(r) for r in rows]
            stations = _station_prefs(s)
            # Held studies are locked for the round: the readers who hold them open and
            # report them, and a plan made on a stale copy would fail to apply (and,
            # with readers busy, keep failing). Ready ones change only under a reader's
            # lock (claims, manual assignment), which the round already holds.
            held = (
                select(*_QUEUED_COLUMNS)
                .where(Study.state.in_(_HELD))
                .order_by(Study.study_uid)
                .with_for_update()
            )
            ready = select(*_QUEUED_COLUMNS).where(Study.state == S.READY.value)
            studies = [_queued(row, stations) for q in (held, ready) for row in s.execute(q)]
            # the clock once the locks are ours: what the round writes happens after whatever
            # it waited for (an assignment must not start before the previous one ended)
            now = self.clock() if at is None else at
            recent = self._recent_rvu(s, now)
            readers = _with_loads(specs, studies, recent, now)
            sticky = self._sticky(s, now)
            result = plan(
                now, studies, readers, self.policy, sticky=sticky, explain=explain, assign=assign
            )
            out = RoundResult(decisions=result.decisions, waiting=result.waiting)
            by_uid = {st.uid: st for st in studies}
            kinds = {k: [d for d in result.decisions if d.kind is k] for k in DecisionKind}
            self._release_many(s, kinds[DecisionKind.RELEASE], by_uid, now, actor="engine")
            for d in kinds[DecisionKind.ESCALATE]:
                self._escalate(s, by_uid[d.study_uid], d, now)
            for d in kinds[DecisionKind.REASSIGN]:
                self._reassign(s, d, now, actor="engine")
            self._assign_many(
                s.connection(), kinds[DecisionKind.ASSIGN], now, mode="push", actor="engine"
            )
            for d in (*kinds[DecisionKind.REASSIGN], *kinds[DecisionKind.ASSIGN]):
                st = by_uid[d.study_uid]
                if st.priority == Priority.STAT and d.radiologist:
                    self._notify_stat(s, st, d.radiologist, d.sets_aside, list(d.reasons), now)
            out.assigned = len(kinds[DecisionKind.ASSIGN])
            out.reassigned = len(kinds[DecisionKind.REASSIGN])
            out.released = len(kinds[DecisionKind.RELEASE])
            out.escalated = len(kinds[DecisionKind.ESCALATE])
        if out.assigned or out.reassigned or out.released or out.escalated:
            logger.info(
                "round: %d assigned, %d reassigned, %d released, %d escalated",
                out.assigned,
                out.reassigned,
                out.released,
                out.escalated,
            )
        return out

    def _guarded_many(
        self, conn: Connection, stmt: Any, params: list[dict[str, Any]], what: str, why: str = ""
    ) -> None:
        """executemany of a guarded UPDATE; every row must have matched."""
        if not params:
            return
        # one row: a plain execute (psycopg runs executemany as a pipeline: more round trips)
        res = conn.execute(stmt, params[0] if len(params) == 1 else params)
        changed = int(getattr(res, "rowcount", -1))
        if changed != len(params):
            detail = f" ({why})" if why else ""
            raise StaleState(f"{what}: {changed} of {len(params)} studies were as expected{detail}")

    def _events_many(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if rows:
            conn.execute(_INSERT_EVENT, rows[0] if len(rows) == 1 else rows)

    def _assign_many(
        self, conn: Connection, decisions: list[Decision], now: float, *, mode: str, actor: str
    ) -> None:
        if not decisions:
            return
        self._guarded_many(
            conn,
            _ASSIGN_READY,
            [
                {
                    "b_uid": d.study_uid,
                    "b_who": d.radiologist,
                    "b_lease": d.lease_expires_at,
                    "b_now": now,
                }
                for d in decisions
            ],
            "assign",
        )
        self._events_many(
            conn,
            [
                {
                    "study_uid": d.study_uid,
                    "kind": "assigned",
                    "from_state": S.READY.value,
                    "to_state": S.ASSIGNED.value,
                    "radiologist": d.radiologist,
                    "actor": actor,
                    "detail": {"mode": mode, "reasons": list(d.reasons)},
                    "at": now,
                }
                for d in decisions
            ],
        )
        rows = [
            {
                "study_uid": d.study_uid,
                "radiologist": d.radiologist,
                "mode": mode,
                "reasons": list(d.reasons),
                "assigned_at": now,
                "end_reason": "",
            }
            for d in decisions
        ]
        conn.execute(_INSERT_ASSIGNMENT, rows[0] if len(rows) == 1 else rows)

    def _release_many(
        self,
        s: Session,
        decisions: list[Decision],
        by_uid: dict[str, QueuedStudy],
        now: float,
        *,
        actor: str,
    ) -> None:
        if not decisions:
            return
        t = _STUDIES
        stmt = (
            update(t)
            .where(
                t.c.study_uid == bindparam("b_uid"),
                t.c.state == bindparam("b_state"),
                t.c.assignee == bindparam("b_who"),
            )
            .values(
                state=S.READY.value,
                assignee=None,
                assigned_at=None,
                lease_expires_at=None,
                started_at=None,
                version=t.c.version + 1,
                updated_at=now,
            )
        )
        states = {d.study_uid: str(by_uid[d.study_uid].state) for d in decisions}
        self._guarded_many(
            s.connection(),
            stmt,
            [
                {"b_uid": d.study_uid, "b_state": states[d.study_uid], "b_who": d.radiologist}
                for d in decisions
            ],
            "release",
            "; ".join(f"{d.study_uid}: {d.reasons[0]}" for d in decisions),
        )
        self._events_many(
            s.connection(),
            [
                {
                    "study_uid": d.study_uid,
                    "kind": "released",
                    "from_state": states[d.study_uid],
                    "to_state": S.READY.value,
                    "radiologist": d.radiologist or "",
                    "actor": actor,
                    "detail": {"reasons": list(d.reasons)},
                    "at": now,
                }
                for d in decisions
            ],
        )
        a = _ASSIGNMENTS
        s.connection().execute(
            update(a)
            .where(a.c.study_uid == bindparam("b_uid"), a.c.ended_at.is_(None))
            .values(ended_at=now, end_reason=bindparam("b_reason")),
            [{"b_uid": d.study_uid, "b_reason": _end_reason(d)} for d in decisions],
        )

    def _reassign(self, s: Session, d: Decision, now: float, *, actor: str) -> None:
        """Apply one engine REASSIGN (rare: at-risk or STAT; batch paths do the rest)."""
        assert d.radiologist is not None and d.previous is not None
        reasons = list(d.reasons)
        self._transition(
            s,
            d.study_uid,
            [S.ASSIGNED],
            S.ASSIGNED,
            kind="reassigned",
            actor=actor,
            now=now,
            assignee=d.radiologist,
            where_assignee=d.previous,
            values={
                "assignee": d.radiologist,
                "assigned_at": now,
                "lease_expires_at": d.lease_expires_at,
            },
            detail={"mode": "push", "previous": d.previous, "reasons": reasons},
        )
        self._close_assignment(s, d.study_uid, "reassigned", now)
        self._open_assignment(s, d.study_uid, d.radiologist, "push", reasons, now)

    def _escalate(self, s: Session, st: QueuedStudy, d: Decision, now: float) -> None:
        res = s.execute(
            update(Study)
            .where(Study.study_uid == st.uid, Study.escalated_at.is_(None))
            .values(escalated_at=now)
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            raise StaleState(f"study {st.uid} was already escalated")
        detail = {
            "reasons": list(d.reasons),
            "priority": Priority(st.priority).label,
            "deadline": st.deadline,
        }
        event_id = self._event(
            s, st.uid, "escalated", st.state, st.state, d.radiologist or "", "engine", detail, now
        )
        self._queue_webhooks(
            s, self.webhook_urls, "study.escalated", event_id, st, d.radiologist, d.reasons, now
        )
        logger.warning("study %s %s", st.uid, "; ".join(d.reasons))

    def _notify_stat(
        self,
        s: Session,
        st: QueuedStudy,
        radiologist: str,
        sets_aside: bool,
        reasons: list[str],
        now: float,
    ) -> None:
        """Queue a ``study.stat_assigned`` webhook for the assignment event just written (a
        reader who claims a STAT needs no telling)."""
        if not self.stat_webhook_urls:
            return
        event_id = s.scalar(
            select(func.max(WorklistEvent.id)).where(
                WorklistEvent.study_uid == st.uid,
                WorklistEvent.kind.in_(("assigned", "reassigned")),
            )
        )
        self._queue_webhooks(
            s,
            self.stat_webhook_urls,
            "study.stat_assigned",
            event_id,
            st,
            radiologist,
            reasons,
            now,
            set_aside=sets_aside,
        )

    def _queue_webhooks(
        self,
        s: Session,
        urls: Sequence[str],
        event: str,
        event_id: int | None,
        st: QueuedStudy,
        radiologist: str | None,
        reasons: Sequence[str],
        now: float,
        **extra: Any,
    ) -> None:
        """One outbox row per URL for ``event`` about ``st`` (no patient data)."""
        payload = {
            "event": event,
            "event_id": event_id,
            "study_uid": st.uid,
            "station": st.station,
            "modality": st.modality,
            "priority": Priority(st.priority).label,
            "deadline": st.deadline,
            "minutes_left": round((st.deadline - now) / 60.0, 1),
            "radiologist": radiologist,
            **extra,
            "reasons": list(reasons),
        }
        for url in urls:
            s.add(WebhookDelivery(event_id=event_id, url=url, payload=payload, next_attempt_at=now))

    def claim_next(self, radiologist: str, now: float | None = None) -> Decision | None:
        """Pull mode: give ``radiologist`` the most urgent study they may read, if any.

        The reader's row is locked first (one claim per reader at a time: capacity holds),
        then what they hold and a page of candidates in deadline order are read, pre-filtered
        in SQL by modality, licence, language and subspecialty; the engine decides. On
        PostgreSQL the study is taken ``FOR UPDATE SKIP LOCKED`` from the engine's first
        few choices, so claimers racing for the head of the queue do not wait: each takes
        the first one nobody else holds. On SQLite claims are serialised by the write lock.
        The statements run on the driver's connection (``pg_claim``, ``sqlite_claim``): a
        claim is a handful of tiny statements, and SQLAlchemy's work per statement cost
        more than the database's."""
        at = now
        if self.engine.dialect.name == "postgresql":
            from reading_queue import pg_claim as claims  # psycopg: PostgreSQL only
        else:
            from reading_queue import sqlite_claim as claims  # type: ignore[no-redef]

        if self._claim_engine is None:
            self._claim_engine = claims.claim_engine(self.engine)
        passed: set[str] = set()
        while True:
            with claims.ClaimConversation(self._claim_engine) as conv:
                cached = self._spec_cache.get(radiologist)
                row, held, page = conv.open(radiologist, cached[2] if cached else None)
                if row is None:
                    raise UnknownRadiologist(f"no radiologist {radiologist!r}")
                # the clock once the reader's lock is ours (see _round)
                now = self.clock() if at is None else at
                if cached is None or cached[0] != row[1]:
                    spec = _spec(conv.radiologist(row[0]))
                    profile = claims.profile_params(spec)
                    cached = self._spec_cache[radiologist] = (row[1], spec, profile)
                    page = None  # read with the old profile (or none)
                _, spec, profile = cached
                reader = _pull_reader(spec, held, now)
                if reader is None:
                    return None
                after: tuple[float, str] | None = None
                while True:
                    rows = page if page is not None else conv.page(profile, after)
                    page = None
                    fresh = [r for r in rows if r.study_uid not in passed]
                    candidates = [_queued(r, _excluding(r, spec.key)) for r in fresh]
                    choices = pull_choices(
                        now, spec.key, candidates, [reader], self.policy, limit=_CLAIM_CHOICES
                    )
                    if choices or len(rows) < claims.PAGE:
                        break
                    after = (float(rows[-1].deadline), str(rows[-1].study_uid))
                if not choices:
                    return None  # (the conversation rolls back on the way out)
                took = conv.take_and_commit(
                    [(d.study_uid, d.lease_expires_at, d.reasons) for d in choices],
                    radiologist,
                    now,
                    f"radiologist:{radiologist}",
                )
                if took is not None:
                    decision = next(d for d in choices if d.study_uid == took)
                    logger.info("study %s claimed by %s", took, radiologist)
                    return decision
                # other claimers hold or took every one of them: look again without them
                passed.update(d.study_uid for d in choices)

    # -- the radiologist's side ------------------------------------------------------------

    def open_study(self, uid: str, radiologist: str, now: float | None = None) -> None:
        """The radiologist opened the study: assigned -> in progress (lease renewed)."""
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            st = self._state_of(s, uid)
            if st.state == S.IN_PROGRESS and st.assignee == radiologist:
                self._renew(s, uid, radiologist, st.priority, now)
                return
            self._transition(
                s,
                uid,
                [S.ASSIGNED],
                S.IN_PROGRESS,
                kind="started",
                actor=f"radiologist:{radiologist}",
                now=now,
                where_assignee=radiologist,
                values={
                    "started_at": now,
                    "lease_expires_at": now + self.policy.lease_s(st.priority),
                },
            )
            s.execute(
                update(Assignment)
                .where(Assignment.study_uid == uid, Assignment.ended_at.is_(None))
                .values(started_at=now)
            )

    def _renew(self, s: Session, uid: str, radiologist: str, priority: int, now: float) -> float:
        until = now + self.policy.lease_s(priority)
        res = s.execute(
            update(Study)
            .where(
                Study.study_uid == uid,
                Study.assignee == radiologist,
                Study.state.in_(_HELD),
            )
            .values(lease_expires_at=until, updated_at=now)
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            raise StaleState(f"study {uid} is not held by {radiologist}: cannot renew its lease")
        return until

    def heartbeat(self, uid: str, radiologist: str, now: float | None = None) -> float:
        """Renew the lease while the radiologist works; returns when it now lapses."""
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            st = self._state_of(s, uid)
            return self._renew(s, uid, radiologist, st.priority, now)

    def release(
        self, uid: str, radiologist: str, reason: str = "", now: float | None = None
    ) -> None:
        """The radiologist hands the study back (e.g. outside their competence)."""
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            st = self._state_of(s, uid)
            state = StudyState(st.state) if st.state in _HELD else S.ASSIGNED
            self._transition(
                s,
                uid,
                [state],
                S.READY,
                kind="released",
                actor=f"radiologist:{radiologist}",
                now=now,
                where_assignee=radiologist,
                values={
                    "assignee": None,
                    "assigned_at": None,
                    "lease_expires_at": None,
                    "started_at": None,
                },
                detail={"reasons": [reason or "released by the radiologist"]},
            )
            self._close_assignment(s, uid, "released", now)

    def submit_preliminary(self, uid: str, radiologist: str, now: float | None = None) -> None:
        self._report(uid, radiologist, S.PRELIMINARY, [S.IN_PROGRESS], now)

    def finalize(self, uid: str, radiologist: str, now: float | None = None) -> None:
        self._report(uid, radiologist, S.FINAL, [S.IN_PROGRESS, S.PRELIMINARY], now)

    def _report(
        self,
        uid: str,
        radiologist: str,
        to: StudyState,
        expected: list[StudyState],
        now: float | None,
    ) -> None:
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            st = self._state_of(s, uid)
            if st.state == S.PRELIMINARY and to == S.FINAL:
                expected = [S.PRELIMINARY]
            elif st.state == S.IN_PROGRESS:
                expected = [S.IN_PROGRESS]
            self._transition(
                s,
                uid,
                expected,
                to,
                kind=to.value,
                actor=f"radiologist:{radiologist}",
                now=now,
                where_assignee=radiologist,
                values={"lease_expires_at": None, "reported_at": st.reported_at or now},
                detail={"turnaround_min": round((now - st.received_at) / 60.0, 1)},
            )
            if expected == [S.IN_PROGRESS]:
                self._close_assignment(s, uid, to.value, now)

    # -- admin -----------------------------------------------------------------------------

    def reassign(
        self,
        uid: str,
        radiologist: str,
        *,
        actor: str,
        force: bool = False,
        now: float | None = None,
    ) -> None:
        """Hand a study to ``radiologist`` whatever its state before reading; refuses an
        ineligible reader unless ``force`` (the reason is recorded)."""
        with self.session.begin() as s:
            row = s.scalar(
                select(Radiologist).where(Radiologist.key == radiologist).with_for_update()
            )
            if row is None:
                raise UnknownRadiologist(f"no radiologist {radiologist!r}")
            st = self._state_of(s, uid)
            now = self.clock() if now is None else now  # once the locks are ours
            if st.state not in (S.READY, *_HELD):
                raise StaleState(f"study {uid} is {st.state}: only unread studies can be assigned")
            queued = _queued(st, _station_prefs(s, {st.station}))
            why = ineligibility(_spec(row).reader(), queued, now, self.policy)
            if why is not None and not force:
                raise NotEligible(f"{radiologist} cannot read study {uid}: {why}")
            reasons = [f"manual by {actor}"] + ([f"forced although {why}"] if why else [])
            previous = st.assignee
            if previous == radiologist:
                raise StaleState(f"study {uid} is already {st.state} with {radiologist}")
            self._transition(
                s,
                uid,
                [StudyState(st.state)],
                S.ASSIGNED,
                kind="reassigned" if previous else "assigned",
                actor=f"admin:{actor}",
                now=now,
                assignee=radiologist,
                values={
                    "assignee": radiologist,
                    "assigned_at": now,
                    "started_at": None,
                    "lease_expires_at": now + self.policy.lease_s(st.priority),
                },
                detail={"mode": "manual", "previous": previous, "reasons": reasons},
            )
            if previous:
                self._close_assignment(s, uid, "reassigned", now)
            self._open_assignment(s, uid, radiologist, "manual", reasons, now)
            if st.priority == Priority.STAT:
                self._notify_stat(s, queued, radiologist, False, reasons, now)

    def set_priority(
        self, uid: str, priority: Priority, *, actor: str, now: float | None = None
    ) -> float:
        """Change a study's priority; its deadline is recomputed from its receipt time."""
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            st = self._state_of(s, uid)
            if st.state in (S.FINAL, S.CANCELLED):
                raise StaleState(f"study {uid} is {st.state}: priority no longer matters")
            station = s.scalar(select(Station).where(Station.name == st.station))
            overrides = dict(station.sla_minutes or {}) if station else {}
            deadline = st.received_at + self.policy.sla_s(int(priority), overrides)
            old = Priority(st.priority)
            self._transition(
                s,
                uid,
                [StudyState(st.state)],
                StudyState(st.state),
                kind="priority_changed",
                actor=f"admin:{actor}",
                now=now,
                assignee=st.assignee or "",
                values={
                    "priority": int(priority),
                    "deadline": deadline,
                    "escalated_at": st.escalated_at if deadline <= st.deadline else None,
                },
                detail={"from": old.label, "to": priority.label, "deadline": deadline},
            )
            return deadline

    def cancel(self, uid: str, *, actor: str, reason: str, now: float | None = None) -> None:
        """Take a study off the worklist (duplicate, wrong patient, sent by mistake)."""
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            st = self._state_of(s, uid)
            self._take_off(s, st, "cancelled", actor, now, {}, {"reason": reason})

    def _take_off(
        self,
        s: Session,
        st: Study,
        kind: str,
        actor: str,
        now: float,
        values: dict[str, Any],
        detail: dict[str, Any],
    ) -> None:
        """Cancel a study that is not final yet (``kind``: cancelled or merged)."""
        if st.state not in _CANCELLABLE:
            verb = "merge it" if kind == "merged" else "cancel"
            raise StaleState(f"study {st.study_uid} is {st.state}: cannot {verb}")
        self._transition(
            s,
            st.study_uid,
            [StudyState(st.state)],
            S.CANCELLED,
            kind=kind,
            actor=f"admin:{actor}",
            now=now,
            assignee=st.assignee or "",
            values={"lease_expires_at": None, **values},
            detail=detail,
        )
        self._close_assignment(s, st.study_uid, kind, now)

    def merge(self, source: str, target: str, *, actor: str, now: float | None = None) -> None:
        """Late series sent under a new Study Instance UID: read them with ``target``.

        The archive keeps the instances as they came (no UID rewriting); the source study
        leaves the worklist pointing at the target, whose reader is told of the added
        instances (a ``late_series`` event, as for a follow-up upload)."""
        if source == target:
            raise QueueError("cannot merge a study into itself")
        now = self.clock() if now is None else now
        with self.session.begin() as s:
            src = self._state_of(s, source)
            dst = self._state_of(s, target)
            if dst.state == S.CANCELLED:
                raise StaleState(f"study {target} is cancelled: merge into another study")
            self._take_off(s, src, "merged", actor, now, {"merged_into": target}, {"into": target})
            late = dst.state not in (S.RECEIVED, S.READY)
            s.execute(
                update(Study)
                .where(Study.study_uid == target)
                .values(
                    instance_count=dst.instance_count + src.instance_count,
                    late_instances=dst.late_instances + (src.instance_count if late else 0),
                    priority=min(dst.priority, src.priority),
                    deadline=min(dst.deadline, src.deadline),
                    updated_at=now,
                )
            )
            self._event(
                s,
                target,
                "late_series",
                dst.state,
                dst.state,
                dst.assignee or "",
                f"admin:{actor}",
                {
                    "merged_from": source,
                    "new_instances": src.instance_count,
                    "addendum_needed": dst.state in (S.PRELIMINARY, S.FINAL),
                },
                now,
            )

    # -- webhooks --------------------------------------------------------------------------

    def deliver_webhooks(
        self, now: float | None = None, *, client: httpx.Client | None = None
    ) -> int:
        """Post due webhooks (escalations, STAT assignments); failures back off (10 s
        doubling, at most 1 h)."""
        now = self.clock() if now is None else now
        with self.read() as s:
            due = list(
                s.scalars(
                    select(WebhookDelivery)
                    .where(
                        WebhookDelivery.delivered_at.is_(None),
                        WebhookDelivery.next_attempt_at <= now,
                    )
                    .order_by(WebhookDelivery.id)
                    .limit(100)
                )
            )
        if not due:
            return 0
        own = client is None
        http = client or httpx.Client(timeout=10.0)
        delivered = 0
        try:
            for d in due:
                error = ""
                try:
                    resp = http.post(d.url, json=d.payload)
                    if resp.status_code >= 300:
                        error = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self.session.begin() as s:
                    if not error:
                        s.execute(
                            update(WebhookDelivery)
                            .where(WebhookDelivery.id == d.id)
                            .values(delivered_at=self.clock(), attempts=d.attempts + 1)
                        )
                        delivered += 1
                    else:
                        backoff = min(3600.0, 10.0 * 2 ** min(d.attempts, 12))
                        s.execute(
                            update(WebhookDelivery)
                            .where(WebhookDelivery.id == d.id)
                            .values(
                                attempts=d.attempts + 1,
                                next_attempt_at=now + backoff,
                                last_error=error[:500],
                            )
                        )
                        logger.warning(
                            "webhook %d to %s failed (%s); next try in %.0f s",
                            d.id,
                            d.url,
                            error,
                            backoff,
                        )
        finally:
            if own:
                http.close()
        return delivered

    # -- queries ---------------------------------------------------------------------------

    def counts(self, now: float | None = None) -> dict[str, dict[str, int]]:
        """Open studies per state and priority, and how many of them are overdue (metrics)."""
        now = self.clock() if now is None else now
        out: dict[str, dict[str, int]] = {"by_state": {}, "overdue": {}}
        with self.read() as s:
            for state, prio, n in s.execute(
                select(Study.state, Study.priority, func.count())
                .where(Study.state.in_([*_OPEN_FOR_ENGINE, S.RECEIVED.value]))
                .group_by(Study.state, Study.priority)
            ):
                out["by_state"][f"{state}/{Priority(prio).label}"] = int(n)
            for prio, n in s.execute(
                select(Study.priority, func.count())
                .where(Study.state.in_(_OPEN_FOR_ENGINE), Study.deadline < now)
                .group_by(Study.priority)
            ):
                out["overdue"][Priority(prio).label] = int(n)
        return out

    def study(self, uid: str) -> Study:
        with self.read() as s:
            return self._state_of(s, uid, lock=False)

    def studies(
        self, *, states: Sequence[str] | None = None, radiologist: str | None = None
    ) -> list[Study]:
        with self.read() as s:
            q = select(Study)
            if states:
                q = q.where(Study.state.in_(list(states)))
            if radiologist:
                q = q.where(Study.assignee == radiologist)
            return list(s.scalars(q.order_by(Study.deadline)))

    def history(self, uid: str) -> list[WorklistEvent]:
        with self.read() as s:
            events = list(
                s.scalars(
                    select(WorklistEvent)
                    .where(WorklistEvent.study_uid == uid)
                    .order_by(WorklistEvent.id)
                )
            )
            if not events and s.get(Study, uid) is None:
                raise UnknownStudy(f"no study {uid} on the worklist")
            return events

    def assignments(self, uid: str) -> list[Assignment]:
        with self.read() as s:
            return list(
                s.scalars(
                    select(Assignment).where(Assignment.study_uid == uid).order_by(Assignment.id)
                )
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
