"""Pull claims: a radiologist takes the next study the engine picks for them."""

from __future__ import annotations

import logging

from sqlalchemy import func, select

from reading_queue.models import Radiologist, Study
from reading_queue.worklist.engine import (
    Decision,
    ineligibility,
    pull_choices,
)
from reading_queue.worklist.store import (
    _CLAIM_CHOICES,
    _HELD,
    NotEligible,
    S,
    StaleState,
    UnknownRadiologist,
    WorklistStore,
    _excluding,
    _pull_reader,
    _queued,
    _spec,
    _station_prefs,
)

logger = logging.getLogger(__name__)


class ClaimsMixin(WorklistStore):
    """Pull claims: a radiologist takes the next study the engine picks for them."""

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
            from reading_queue.worklist import pg_claim as claims  # psycopg: PostgreSQL only
        else:
            from reading_queue.worklist import sqlite_claim as claims  # type: ignore[no-redef]

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

    def claim(self, uid: str, radiologist: str, now: float | None = None) -> None:
        """The radiologist takes one particular study from the pool (the worklist page's
        "claim" button): it must be ready, they must be eligible for it now (shift
        included) and have a free place (``max_concurrent``). ``StaleState`` when it is no
        longer ready (someone else took it), ``NotEligible`` otherwise."""
        with self.session.begin() as s:
            row = s.scalar(
                select(Radiologist).where(Radiologist.key == radiologist).with_for_update()
            )
            if row is None:
                raise UnknownRadiologist(f"no radiologist {radiologist!r}")
            st = self._state_of(s, uid)
            now = self.clock() if now is None else now  # once the locks are ours
            if st.state != S.READY:
                raise StaleState(f"study {uid} is {st.state}: only a ready study can be claimed")
            spec = _spec(row)
            queued = _queued(st, _station_prefs(s, {st.station}))
            why = ineligibility(spec.reader(), queued, now, self.policy)
            if why is not None:
                raise NotEligible(f"{radiologist} cannot read study {uid}: {why}")
            held = s.scalar(
                select(func.count())
                .select_from(Study)
                .where(Study.assignee == radiologist, Study.state.in_(_HELD))
            )
            if int(held or 0) >= spec.max_concurrent:
                raise NotEligible(
                    f"{radiologist} already holds {held} studies (at most {spec.max_concurrent})"
                )
            reasons = ["claimed from the pool"]
            self._transition(
                s,
                uid,
                [S.READY],
                S.ASSIGNED,
                kind="assigned",
                actor=f"radiologist:{radiologist}",
                now=now,
                assignee=radiologist,
                values={
                    "assignee": radiologist,
                    "assigned_at": now,
                    "started_at": None,
                    "lease_expires_at": now + self.policy.lease_s(st.priority),
                },
                detail={"mode": "pull", "reasons": reasons},
            )
            self._open_assignment(s, uid, radiologist, "pull", reasons, now)
        logger.info("study %s claimed by %s", uid, radiologist)
