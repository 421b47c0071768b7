"""Read-only views: counts, one study, lists, history and assignments."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select

from reading_queue.models import (
    Assignment,
    Study,
    WorklistEvent,
)
from reading_queue.worklist.store import _OPEN_FOR_ENGINE, S, UnknownStudy, WorklistStore
from telerad.core.priority import Priority


class QueriesMixin(WorklistStore):
    """Read-only views: counts, one study, lists, history and assignments."""

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
