"""Admin changes: reassign, priority, cancel, merge."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from reading_queue import QueueError
from reading_queue.models import (
    Radiologist,
    Station,
    Study,
)
from reading_queue.worklist.engine import (
    StudyState,
    ineligibility,
)
from reading_queue.worklist.store import (
    _CANCELLABLE,
    _HELD,
    NotEligible,
    S,
    StaleState,
    UnknownRadiologist,
    _queued,
    _spec,
    _station_prefs,
)
from reading_queue.worklist.webhooks import WebhooksMixin
from telerad.core.priority import Priority


class AdminMixin(WebhooksMixin):
    """Admin changes: reassign, priority, cancel, merge."""

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
