"""Push rounds: the engine's plan for every open study, applied in one transaction."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from reading_queue.models import (
    Radiologist,
    Study,
)
from reading_queue.worklist.engine import (
    Decision,
    DecisionKind,
    QueuedStudy,
    plan,
)
from reading_queue.worklist.store import (
    _ASSIGN_READY,
    _ASSIGNMENTS,
    _HELD,
    _INSERT_ASSIGNMENT,
    _INSERT_EVENT,
    _QUEUED_COLUMNS,
    _RECENT_WORK_S,
    _STUDIES,
    RoundResult,
    S,
    StaleState,
    _end_reason,
    _queued,
    _spec,
    _station_prefs,
    _with_loads,
)
from reading_queue.worklist.webhooks import WebhooksMixin
from telerad.core.priority import Priority

logger = logging.getLogger(__name__)


class RoundsMixin(WebhooksMixin):
    """Push rounds: the engine's plan for every open study, applied in one transaction."""

    def _recent_rvu(self, s: Session, now: float, key: str | None = None) -> dict[str, float]:
        # Summed here, not by GROUP BY: SQLite (no statistics) would walk the assignee index
        # of the whole history for the grouping (~70 ms at 100,000 studies) instead of the
        # window's few rows in ix_studies_reported_at (~0.2 ms).
        q = select(Study.assignee, Study.rvu).where(
            Study.reported_at > now - _RECENT_WORK_S, Study.assignee.is_not(None)
        )
        if key is not None:
            q = q.where(Study.assignee == key)
        out: dict[str, float] = defaultdict(float)
        for who, rvu in s.execute(q):
            out[str(who)] += float(rvu or 0.0)
        return dict(out)

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
