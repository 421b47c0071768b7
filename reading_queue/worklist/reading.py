"""The radiologist's side: open, heartbeat (lease renewal), release, report steps."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from reading_queue.models import (
    Assignment,
    Study,
)
from reading_queue.worklist.engine import (
    StudyState,
)
from reading_queue.worklist.store import _HELD, S, StaleState, WorklistStore


class ReadingMixin(WorklistStore):
    """The radiologist's side: open, heartbeat (lease renewal), release, report steps."""

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
