"""Who may see which study: the one access rule, applied by every route (DICOMweb included).

- **admin**: every study.
- **clinic**: the studies of its own station (``hub_studies.station``), from the moment the
  hub holds them.
- **radiologist**: the studies on the worklist assigned to them (held, or reported by them),
  the ready pool they are eligible for, and the priors of both: studies of the same patient
  (``patient_key``) from the same institution.

Eligibility for the pool is the engine's, without the clock: modality, subspecialty,
licence covering the study's jurisdiction (none: no one), report language, and not
excluded by the station. Shifts are left out on purpose: whether a radiologist may *see*
a study does not flip at the end of a shift (claiming still follows the shift).

Everything is a SQL condition on a study UID column (``visible``), so a search filters in
the database and a page of results is a page of what the caller may see; ``can_see`` is the
same condition for one UID. A UID that exists but is not the caller's is indistinguishable
from one that does not exist: callers answer both with the same 404.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, exists, false, func, or_, select, true
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from reading_queue.models import HubStudy, Radiologist, Station, Study

#: the worklist state of the pool a radiologist may look into
POOL_STATE = "ready"


class Caller(Protocol):
    """``reading_queue.accounts.Principal``, by shape."""

    @property
    def role(self) -> str: ...

    @property
    def radiologist(self) -> str | None: ...

    @property
    def station(self) -> str | None: ...


def _like_prefix(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "-%"


#: how long one caller's answer for one study is reused: a viewer fetching a study's frames
#: asks hundreds of times a second, and a reassignment may take this long to be felt
DECISION_TTL_S = 2.0
_DECISIONS_KEPT = 4096


class Access:
    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.clock = clock
        self._decisions: OrderedDict[tuple[Any, ...], tuple[float, bool]] = OrderedDict()
        self._lock = threading.Lock()

    # -- the rule, as SQL ----------------------------------------------------------------

    def visible(self, who: Caller, uid: Any) -> ColumnElement[bool]:
        """A condition on the study UID column ``uid``: true for the studies ``who`` may
        see. It reads the caller's roster row and station exclusions now (one small query)
        and embeds them, so it is cheap to evaluate per row."""
        return self.visibility(who)(uid)

    def visibility(self, who: Caller) -> Callable[[Any], ColumnElement[bool]]:
        """``visible`` for any UID column, with the caller's roster row read now, once.
        Call it before taking a connection for the statement: a request that holds one
        pooled connection while it asks for a second starves the pool under load (every
        worker holds one and waits for another until the pool times out)."""
        if who.role == "admin":
            return lambda uid: true()
        if who.role == "clinic":
            station = who.station
            if not station:
                return lambda uid: false()
            return lambda uid: exists(
                select(HubStudy.study_uid).where(
                    HubStudy.study_uid == uid, HubStudy.station == station
                )
            )
        if who.role == "radiologist" and who.radiologist:
            spec = self._reader(who.radiologist)
            if spec is None:
                return lambda uid: false()
            return lambda uid: _visible_to_reader(spec, uid)
        return lambda uid: false()

    def worklist(self, who: Caller) -> ColumnElement[bool]:
        """A condition on ``studies``: the worklist entries ``who`` may see. For a
        radiologist: their own and the pool, without the priors (a prior is something to
        look at, not something to read: it never shows as work)."""
        if who.role == "admin":
            return true()
        if who.role == "clinic":
            return Study.station == who.station if who.station else false()
        if who.role == "radiologist" and who.radiologist:
            spec = self._reader(who.radiologist)
            return false() if spec is None else _own_or_pool(spec, Study)
        return false()

    def worklist_branches(self, who: Caller) -> list[ColumnElement[bool]]:
        """``worklist`` as conditions whose OR it is (a radiologist's own studies, the pool),
        so a page can be read branch by branch, each in index order: a radiologist's page
        then reads about a page of the pool instead of the whole pool."""
        if who.role == "radiologist" and who.radiologist:
            spec = self._reader(who.radiologist)
            return [false()] if spec is None else _own_and_pool(spec, Study)
        return [self.worklist(who)]

    def _reader(self, key: str) -> _ReaderSpec | None:
        """What the pool condition needs of radiologist ``key`` (None: not on the roster)."""
        with self.engine.execution_options(read_only=True).connect() as conn:
            row = conn.execute(
                select(
                    Radiologist.active,
                    Radiologist.modalities,
                    Radiologist.subspecialties,
                    Radiologist.licences,
                    Radiologist.languages,
                ).where(Radiologist.key == key)
            ).first()
            if row is None:
                return None
            excluding = tuple(
                name
                for name, excluded in conn.execute(select(Station.name, Station.excluded))
                if key in (excluded or [])
            )
        active, modalities, subspecialties, licences, languages = row
        return _ReaderSpec(
            key=key,
            active=bool(active),
            modalities=tuple(m.upper() for m in modalities or ()),
            subspecialties=tuple(subspecialties or ()),
            licences=tuple(licences or ()),
            languages=tuple(languages or ()),
            excluded_by=excluding,
        )

    # -- the rule, for one study or a few ------------------------------------------------

    def can_see(self, who: Caller, study_uid: str) -> bool:
        """Whether ``who`` may see the study; one caller's answer is reused for
        ``DECISION_TTL_S`` (a frame request must not cost a database round trip each)."""
        key = (who.role, who.radiologist, who.station, study_uid)
        now = self.clock()
        with self._lock:
            hit = self._decisions.get(key)
            if hit is not None and now - hit[0] < DECISION_TTL_S:
                return hit[1]
        seen = bool(self.filter(who, [study_uid]))
        with self._lock:
            self._decisions[key] = (now, seen)
            self._decisions.move_to_end(key)
            while len(self._decisions) > _DECISIONS_KEPT:
                self._decisions.popitem(last=False)
        return seen

    def filter(self, who: Caller, study_uids: Iterable[str]) -> set[str]:
        """The UIDs among ``study_uids`` that ``who`` may see."""
        uids = list(dict.fromkeys(study_uids))
        if not uids:
            return set()
        if who.role == "admin":
            return self._existing(uids)
        found: set[str] = set()
        visible = self.visibility(who)  # before the connection: see ``visibility``
        with self.engine.execution_options(read_only=True).connect() as conn:
            for at in range(0, len(uids), 500):
                chunk = uids[at : at + 500]
                known = select(HubStudy.study_uid.label("uid")).where(HubStudy.study_uid.in_(chunk))
                on_worklist = select(Study.study_uid.label("uid")).where(Study.study_uid.in_(chunk))
                candidates = known.union(on_worklist).subquery()
                stmt = select(candidates.c.uid).where(visible(candidates.c.uid))
                found.update(conn.scalars(stmt))
        return found

    def _existing(self, uids: list[str]) -> set[str]:
        with self.engine.execution_options(read_only=True).connect() as conn:
            out: set[str] = set()
            for at in range(0, len(uids), 500):
                chunk = uids[at : at + 500]
                out.update(
                    conn.scalars(select(HubStudy.study_uid).where(HubStudy.study_uid.in_(chunk)))
                )
                out.update(conn.scalars(select(Study.study_uid).where(Study.study_uid.in_(chunk))))
            return out


@dataclass(frozen=True)
class _ReaderSpec:
    key: str
    active: bool
    modalities: tuple[str, ...]
    subspecialties: tuple[str, ...]
    licences: tuple[str, ...]
    languages: tuple[str, ...]
    excluded_by: tuple[str, ...]


def _own_or_pool(spec: _ReaderSpec, t: Any) -> ColumnElement[bool]:
    """On the studies table (or an alias ``t`` of it): assigned to the reader, or in the
    ready pool they are eligible for."""
    return or_(*_own_and_pool(spec, t))


def _own_and_pool(spec: _ReaderSpec, t: Any) -> list[ColumnElement[bool]]:
    """``_own_or_pool`` as its branches: assigned to the reader; the pool (when any)."""
    mine: ColumnElement[bool] = t.assignee == spec.key
    if not spec.active or not spec.modalities or not spec.licences:
        return [mine]
    pool = [
        t.state == POOL_STATE,
        func.upper(t.modality).in_(list(spec.modalities)),
        or_(t.subspecialty == "", t.subspecialty.in_(list(spec.subspecialties))),
        t.jurisdiction != "",
        or_(
            *(
                or_(t.jurisdiction == lic, t.jurisdiction.like(_like_prefix(lic), escape="\\"))
                for lic in spec.licences
            )
        ),
    ]
    if spec.languages:
        pool.append(or_(t.language == "", t.language.in_(list(spec.languages))))
    if spec.excluded_by:
        pool.append(t.station.notin_(list(spec.excluded_by)))
    return [mine, and_(*pool)]


#: the aliases of ``_visible_to_reader``, made once: a new alias per call costs more to
#: build (each attribute adapted anew) than the whole statement costs to run
_VISIBLE = aliased(Study, name="visible_study")
_PRIOR_OF = aliased(Study, name="prior_of")


def _visible_to_reader(spec: _ReaderSpec, uid: Any) -> ColumnElement[bool]:
    """The reader's own and pool studies, and every study of the same patient (same
    ``patient_key``, same institution) as one of them: a condition on the row ``uid``
    names, so the database looks at the candidates only (one primary-key and one
    ``patient_key`` lookup each) instead of building the reader's whole visible set."""
    study, base = _VISIBLE, _PRIOR_OF
    prior = and_(
        study.patient_key != "",
        exists(
            select(base.study_uid).where(
                base.patient_key == study.patient_key,
                base.institution == study.institution,
                _own_or_pool(spec, base),
            )
        ),
    )
    return exists(
        select(study.study_uid).where(study.study_uid == uid, or_(_own_or_pool(spec, study), prior))
    )
