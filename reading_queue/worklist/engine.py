"""The assignment engine: who reads what next, and why.

Pure and deterministic: plain data in (``now``, the open studies, the readers with their
current load, the policy), decisions out, each carrying its reasons. No clock reads, no I/O:
the same input always gives the same plan, which is what lets the simulator, the property
tests and the database-backed worklist share it.

Order. Studies are read by deadline slack within priority classes. A study whose remaining
slack is shorter than a more urgent class's whole SLA is promoted into that class (ageing),
so a ROUTINE study climbs to URGENT and then STAT as its deadline nears and is never starved.

Choice. Among the eligible readers with capacity, a study goes to the reader who would finish
it soonest (projected RVU-weighted work ahead of it, since readers work their own list by
urgency), plus a fairness term for recent work, minus a bonus for the station's preferred
readers. A patient's new study goes to the reader of their open/recent study ("sticky") when
that reader is eligible and would still meet the deadline.

STAT. A reader sets a non-STAT case aside for a STAT when finishing it first would take the
STAT into its escalation window (policy ``stat_interrupts``), and the projection says so. A
STAT goes to a free reader who would be done before that window, else to whoever would be
done first; when that reader is at capacity, their least urgent unopened study moves to
make room ("moved: makes room on ...").

Leases. An assignment lapses at ``lease_expires_at`` unless renewed; an assigned study that
was not opened goes back to the pool when its reader's shift ends, they are deactivated or
their capacity drops. A study close to its deadline is escalated once and moved to a free
eligible reader when its current reader would miss the deadline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo

from reading_queue.worklist.policy import QueuePolicy
from telerad.core.priority import Priority

__all__ = [
    "FAIRNESS_WINDOW_S",
    "Decision",
    "DecisionKind",
    "Plan",
    "QueuedStudy",
    "Reader",
    "Shift",
    "ShiftStatus",
    "StudyState",
    "effective_class",
    "gini",
    "ineligibility",
    "licence_covers",
    "next_for",
    "on_shift_seconds",
    "order_deadline",
    "plan",
    "pull_choices",
    "remaining_rvu",
    "shift_status",
    "urgency_key",
]


class StudyState(StrEnum):
    RECEIVED = "received"
    READY = "ready"
    ASSIGNED = "assigned"
    IN_PROGRESS = "in_progress"
    PRELIMINARY = "preliminary"
    FINAL = "final"
    CANCELLED = "cancelled"


#: states in which a study occupies a reader
HELD = (StudyState.ASSIGNED, StudyState.IN_PROGRESS)
#: states in which a study still needs work from someone
OPEN = (StudyState.RECEIVED, StudyState.READY, StudyState.ASSIGNED, StudyState.IN_PROGRESS)


class DecisionKind(StrEnum):
    ASSIGN = "assign"
    REASSIGN = "reassign"
    RELEASE = "release"
    ESCALATE = "escalate"


@dataclass(frozen=True, slots=True)
class Shift:
    """A weekly working window in the reader's time zone; ``end <= start`` runs past midnight.

    ``weekday`` is 0 for Monday. ``end == time(0)`` with ``start == time(0)`` is a whole day.
    """

    weekday: int
    start: time
    end: time
    on_call: bool = False


@dataclass(frozen=True, slots=True)
class ShiftStatus:
    on_shift: bool
    on_call: bool
    #: epoch seconds when the current window ends, following back-to-back windows of the same
    #: kind (None when off)
    ends_at: float | None = None
    #: the same, following windows of any kind (a day shift that runs into on-call)
    duty_ends_at: float | None = None


@dataclass(frozen=True, slots=True)
class Reader:
    """A radiologist as the engine sees them: what they may read and how loaded they are."""

    key: str
    modalities: frozenset[str]
    licences: frozenset[str]
    languages: frozenset[str] = frozenset()
    subspecialties: frozenset[str] = frozenset()
    timezone: str = "UTC"
    shifts: tuple[Shift, ...] = ()
    max_concurrent: int = 4
    rvu_per_hour: float = 8.0
    active: bool = True
    #: RVU of the studies they hold but have not opened yet, per priority STAT/URGENT/ROUTINE
    open_rvu: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: studies they hold, opened or not
    open_count: int = 0
    #: RVU still to do on the studies they have open: this comes before anything new --
    #: except a STAT, which a reader sets a non-STAT case aside for (policy ``stat_interrupts``)
    in_progress_rvu: float = 0.0
    #: the part of ``in_progress_rvu`` that is STAT work (a new STAT waits for that)
    in_progress_stat_rvu: float = 0.0
    #: RVU they finished recently (the fairness window, e.g. this shift)
    recent_rvu: float = 0.0


@dataclass(frozen=True, slots=True)
class QueuedStudy:
    uid: str
    priority: int
    modality: str
    received_at: float
    deadline: float
    rvu: float
    jurisdiction: str = ""
    language: str = ""
    subspecialty: str = ""
    station: str = ""
    #: opaque key of the patient (a hash), for stickiness; never a name or an ID
    patient_key: str = ""
    preferred: frozenset[str] = frozenset()
    excluded: frozenset[str] = frozenset()
    state: StudyState = StudyState.READY
    assignee: str | None = None
    lease_expires_at: float | None = None
    escalated: bool = False
    #: when its reader opened it (in progress)
    started_at: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    kind: DecisionKind
    study_uid: str
    #: the reader it goes to (assign/reassign) or leaves (release)
    radiologist: str | None
    previous: str | None = None
    reasons: tuple[str, ...] = ()
    #: for assign/reassign: when the new lease lapses
    lease_expires_at: float | None = None
    #: for assign/reassign of a STAT: the reader is expected to set the case in hand aside
    sets_aside: bool = False


@dataclass
class Plan:
    decisions: list[Decision] = field(default_factory=list)
    #: ready studies nobody could take this round (uid -> why), when ``explain`` was asked
    waiting: dict[str, str] = field(default_factory=dict)

    def of_kind(self, kind: DecisionKind) -> list[Decision]:
        return [d for d in self.decisions if d.kind is kind]


#: what an opened study that ran past its expected time is assumed to still need, as a share
#: of its RVU (reading times have a long tail: overrunning reads tend to overrun further)
OVERRUN_SHARE = 0.3


def remaining_rvu(rvu: float, started_at: float | None, now: float, rvu_per_hour: float) -> float:
    """Estimated RVU left on an opened study: its RVU less what the reader's pace has done
    since they opened it (never below ``OVERRUN_SHARE``: an overrun study is not done)."""
    if started_at is None:
        return rvu
    done = max(0.0, now - started_at) / 3600.0 * rvu_per_hour
    return max(rvu * OVERRUN_SHARE, rvu - done)


# -- shifts -------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _local_ts(day: date, at: time, zone: ZoneInfo) -> float:
    """Epoch seconds of a wall-clock time: the first occurrence in an autumn repeated hour,
    and the end of the gap (the first instant the clock shows a later time) in spring."""
    naive = datetime.combine(day, at)
    ts = naive.replace(tzinfo=zone).timestamp()
    if datetime.fromtimestamp(ts, zone).replace(tzinfo=None) == naive:
        return ts
    other = naive.replace(tzinfo=zone, fold=1).timestamp()
    lo, hi = int(min(ts, other)), int(max(ts, other))
    for x in range(lo - lo % 60, hi + 61, 60):
        if datetime.fromtimestamp(x, zone).replace(tzinfo=None) >= naive:
            return float(x)
    return float(hi)


def _window(day: date, shift: Shift, zone: ZoneInfo) -> tuple[float, float]:
    """The shift's [start, end) on ``day`` in epoch seconds; ``end <= start`` runs past
    midnight (so 00:00-00:00 is a whole day)."""
    end_day = day + timedelta(days=1) if shift.end <= shift.start else day
    return _local_ts(day, shift.start, zone), _local_ts(end_day, shift.end, zone)


@lru_cache(maxsize=4096)
def _windows(
    timezone: str, shifts: tuple[Shift, ...], today: date
) -> tuple[tuple[float, float, bool], ...]:
    """Every window from yesterday to a week ahead, as instants (cached: it depends on the
    date, not the time, and a round asks for each reader)."""
    zone = _zone(timezone)
    return tuple(
        (*_window(today + timedelta(days=k), shift, zone), shift.on_call)
        for k in range(-1, 8)
        for shift in shifts
        if shift.weekday == (today + timedelta(days=k)).weekday()
    )


def shift_status(reader: Reader, now: float) -> ShiftStatus:
    """Whether ``reader`` works at ``now``; a regular shift wins over an overlapping on-call.

    ``ends_at`` is when they stop, following back-to-back windows of the same kind (a reader
    on ``daily 00:00-24:00`` does not leave at midnight)."""
    if not reader.shifts:
        return ShiftStatus(False, False)
    zone = _zone(reader.timezone)
    today = datetime.fromtimestamp(now, zone).date()
    windows = _windows(reader.timezone, reader.shifts, today)
    current = [w for w in windows if w[0] <= now < w[1]]
    if not current:
        return ShiftStatus(False, False)
    # a regular shift beats on-call; of two alike, the one that runs longer
    _, end, on_call = min(current, key=lambda w: (w[2], -w[1]))

    def chain(end: float, same_kind: bool) -> float:
        for _ in range(len(windows)):
            later = [
                w[1] for w in windows if (w[2] == on_call or not same_kind) and w[0] <= end < w[1]
            ]
            if not later:
                break
            end = max(later)
        return end

    return ShiftStatus(not on_call, on_call, chain(end, True), chain(end, False))


#: a STAT study pushed to a busy reader moves to a free one that would finish this much sooner
STAT_MOVE_MARGIN_S = 120.0

#: the fairness window: ``Reader.recent_rvu`` is what they finished in the last 12 hours
FAIRNESS_WINDOW_S = 12 * 3600.0


def on_shift_seconds(reader: Reader, start: float, end: float) -> float:
    """Seconds of [start, end] the reader was on a shift (regular or on call)."""
    if not reader.shifts or end <= start:
        return 0.0
    zone = _zone(reader.timezone)
    last = datetime.fromtimestamp(end, zone).date()
    days = int((end - start) // 86400) + 2
    spans: list[tuple[float, float]] = []
    for back in range(days + 1):
        day = last - timedelta(days=back)
        for shift in reader.shifts:
            if shift.weekday == day.weekday():
                a, b = _window(day, shift, zone)
                lo, hi = max(start, a), min(end, b)
                if hi > lo:
                    spans.append((lo, hi))
    total, reach = 0.0, start
    for lo, hi in sorted(spans):  # overlapping windows count once
        lo = max(lo, reach)
        if hi > lo:
            total += hi - lo
            reach = hi
    return total


# -- ordering -----------------------------------------------------------------------------


#: Why no one may read a study whose station has no jurisdiction (shown in listings).
NEEDS_JURISDICTION = "needs jurisdiction"


def licence_covers(licence: str, jurisdiction: str) -> bool:
    """A national licence (``VN``) covers its provinces (``VN-HN``); a provincial one only it.
    No jurisdiction is covered by no licence: such a study waits for an admin to set it."""
    if not jurisdiction:
        return False
    return jurisdiction == licence or jurisdiction.startswith(licence + "-")


def order_deadline(study: QueuedStudy, policy: QueuePolicy) -> float:
    """The deadline the queue orders by: the study's own, but never later than the hub's SLA
    for its priority. A generous contract (48 h routine) then means fewer breaches, not
    being read last whenever the hub is busy."""
    return min(study.deadline, study.received_at + policy.sla_s(study.priority))


def effective_class(study: QueuedStudy, now: float, policy: QueuePolicy) -> int:
    left = order_deadline(study, policy) - now
    for cls in (Priority.STAT, Priority.URGENT):
        if cls < study.priority and left <= policy.sla_s(cls):
            return int(cls)
        if cls >= study.priority:
            break
    return int(study.priority)


def urgency_key(
    study: QueuedStudy, now: float, policy: QueuePolicy
) -> tuple[int, float, float, str]:
    """Sort key: (class after ageing, slack to the ordering deadline, arrival, uid)."""
    left = order_deadline(study, policy) - now
    return (effective_class(study, now, policy), left, study.received_at, study.uid)


def _key_function(
    now: float, policy: QueuePolicy
) -> Callable[[QueuedStudy], tuple[int, float, float, str]]:
    """``urgency_key`` with the SLAs looked up once (a round sorts thousands of studies)."""
    stat_s, urgent_s = policy.sla_s(Priority.STAT), policy.sla_s(Priority.URGENT)
    sla = [policy.sla_s(p) for p in Priority]

    def key(st: QueuedStudy) -> tuple[int, float, float, str]:
        left = min(st.deadline, st.received_at + sla[st.priority]) - now
        cls = st.priority
        if cls > 0 and left <= stat_s:
            cls = 0
        elif cls > 1 and left <= urgent_s:
            cls = 1
        return (cls, left, st.received_at, st.uid)

    return key


# -- eligibility --------------------------------------------------------------------------


def _static_ineligibility(
    reader: Reader, status: ShiftStatus, study: QueuedStudy, policy: QueuePolicy
) -> str | None:
    """Why ``reader`` may not read ``study`` at all (None: they may, capacity permitting)."""
    if not reader.active:
        return "inactive"
    if study.modality.upper() not in reader.modalities:
        return f"does not read {study.modality}"
    if study.subspecialty and study.subspecialty not in reader.subspecialties:
        return f"no {study.subspecialty} subspecialty"
    if not study.jurisdiction:
        return NEEDS_JURISDICTION
    if not any(licence_covers(lic, study.jurisdiction) for lic in reader.licences):
        return f"not licensed for {study.jurisdiction}"
    if study.language and reader.languages and study.language not in reader.languages:
        return f"does not report in {study.language}"
    if reader.key in study.excluded:
        return "excluded by the station"
    if status.on_shift:
        return None
    if status.on_call:
        if policy.on_call_takes(study.priority):
            return None
        return f"on call only ({', '.join(policy.on_call_priorities)})"
    return "off shift"


def ineligibility(
    reader: Reader,
    study: QueuedStudy,
    now: float,
    policy: QueuePolicy,
    *,
    status: ShiftStatus | None = None,
) -> str | None:
    """Why ``reader`` may not read ``study`` at ``now`` (None: eligible; capacity aside).

    Pass ``status`` when the caller already has the reader's shift status for ``now``."""
    if status is None:
        status = shift_status(reader, now)
    return _static_ineligibility(reader, status, study, policy)


@dataclass(slots=True)
class _Load:
    """A reader's load as it evolves during one planning round."""

    reader: Reader
    status: ShiftStatus
    now: float
    count: int
    rvu: list[float]
    in_progress: float
    #: the STAT part of ``in_progress``
    in_progress_stat: float = 0.0
    #: a new STAT comes before the non-STAT case in hand when waiting for it would finish
    #: the STAT within ``window`` of its deadline (policy ``stat_interrupts``; window: the
    #: STAT escalation time)
    interrupts: bool = False
    window: float = 0.0
    #: per priority: does an on-call reader take it (the policy's answer, looked up once)
    on_call_takes: tuple[bool, ...] = (True, True, False)
    _utilisation: float | None = None

    @property
    def utilisation(self) -> float:
        """Share of their recent shift time spent reading (the fairness term)."""
        if self._utilisation is None:
            r = self.reader
            if r.recent_rvu <= 0:
                self._utilisation = 0.0
            else:
                worked = on_shift_seconds(r, self.now - FAIRNESS_WINDOW_S, self.now)
                busy = r.recent_rvu / r.rvu_per_hour * 3600.0
                self._utilisation = min(1.0, busy / max(worked, 3600.0))
        return self._utilisation

    def ahead_of(self, priority: int) -> float:
        """RVU the reader works before a new study of ``priority`` when they finish what they
        have open first, then their list by urgency."""
        return self.in_progress + sum(self.rvu[: priority + 1])

    def _plan_for(self, study: QueuedStudy, own: bool) -> tuple[float, bool]:
        """RVU they work until ``study`` is done (``own``: it is already in their list), and
        whether they set the case in hand aside for it: a STAT that would otherwise finish
        inside its escalation window, when readers interrupt for STAT. A reader on a STAT
        already has their other cases aside: a new STAT comes after the STAT work only."""
        finish = self.ahead_of(study.priority) + (0.0 if own else study.rvu)
        if not self.interrupts or study.priority != Priority.STAT:
            return finish, False
        other = self.in_progress - self.in_progress_stat
        if other <= 1e-9:
            return finish, False
        if self.in_progress_stat > 1e-9:
            return finish - other, False
        if self.now + finish / self.reader.rvu_per_hour * 3600.0 <= study.deadline - self.window:
            return finish, False
        return finish - other, True

    def interrupted_by(self, study: QueuedStudy, own: bool = False) -> bool:
        """Whether they would set a non-STAT case aside for ``study``."""
        return self._plan_for(study, own)[1]

    def finish_minutes(self, study: QueuedStudy, own: bool = False) -> float:
        """Minutes of work until ``study`` would be done with them."""
        return self._plan_for(study, own)[0] / self.reader.rvu_per_hour * 60.0

    def start_minutes(self, study: QueuedStudy) -> float:
        """Minutes of work before they would open ``study``."""
        return self.finish_minutes(study) - study.rvu / self.reader.rvu_per_hour * 60.0

    def in_time(self, study: QueuedStudy, policy: QueuePolicy) -> bool:
        """Would they open ``study`` before they stop taking studies like it? (Otherwise it
        would only bounce back.)"""
        ends = self._ends(study, policy)
        return ends is None or self.now + self.start_minutes(study) * 60.0 < ends

    def has_room(self, study: QueuedStudy, policy: QueuePolicy) -> bool:
        if self.count >= self.reader.max_concurrent:
            return False
        if not self.in_time(study, policy):
            return False
        if study.priority == Priority.STAT or self.count == 0:
            return True
        return self.finish_minutes(study) <= policy.max_backlog_minutes

    def add(self, study: QueuedStudy) -> None:
        self.count += 1
        self.rvu[study.priority] += study.rvu

    def remove(self, study: QueuedStudy) -> None:
        self.count = max(0, self.count - 1)
        if study.state == StudyState.IN_PROGRESS:
            left = remaining_rvu(study.rvu, study.started_at, self.now, self.reader.rvu_per_hour)
            self.in_progress = _clean(self.in_progress - left)
            if study.priority == Priority.STAT:
                self.in_progress_stat = _clean(self.in_progress_stat - left)
        else:
            self.rvu[study.priority] = _clean(self.rvu[study.priority] - study.rvu)

    def _ends(self, study: QueuedStudy, policy: QueuePolicy) -> float | None:
        """When they stop taking a study like this one: on-call hours count for the
        priorities on-call readers take."""
        if self.on_call_takes[study.priority]:
            return self.status.duty_ends_at
        return self.status.ends_at

    def why_no_room(self, study: QueuedStudy, policy: QueuePolicy) -> str:
        if self.count >= self.reader.max_concurrent:
            return "at capacity"
        if not self.has_room(study, policy):
            ends = self._ends(study, policy)
            if ends is not None and self.now + self.start_minutes(study) * 60 >= ends:
                return "shift ends before they could start it"
            return f"more than {policy.max_backlog_minutes:.0f} min of work ahead"
        return "just released by them"


def _clean(value: float) -> float:
    """RVU sums after subtractions: no negative or rounding dust (1e-16 is not work)."""
    return 0.0 if value < 1e-9 else value


def _loads(readers: Iterable[Reader], now: float, policy: QueuePolicy) -> dict[str, _Load]:
    on_call = tuple(policy.on_call_takes(p) for p in Priority)
    return {
        r.key: _Load(
            r,
            shift_status(r, now),
            now,
            r.open_count,
            list(r.open_rvu),
            r.in_progress_rvu,
            r.in_progress_stat_rvu,
            policy.stat_interrupts,
            policy.escalate_s(Priority.STAT),
            on_call,
        )
        for r in readers
    }


def _profile(study: QueuedStudy, policy: QueuePolicy) -> tuple[object, ...]:
    on_call_ok = policy.on_call_takes(study.priority)
    return (
        study.modality.upper(),
        study.subspecialty,
        study.jurisdiction,
        study.language,
        study.excluded,
        on_call_ok,
    )


class _Eligibility:
    """Caches who may read which kind of study: profiles repeat, readers are few."""

    def __init__(self, loads: Mapping[str, _Load], policy: QueuePolicy) -> None:
        self.loads = loads
        self.policy = policy
        self._cache: dict[tuple[object, ...], list[_Load]] = {}

    def readers_for(self, study: QueuedStudy) -> list[_Load]:
        key = _profile(study, self.policy)
        found = self._cache.get(key)
        if found is None:
            found = [
                load
                for _, load in sorted(self.loads.items())
                if _static_ineligibility(load.reader, load.status, study, self.policy) is None
            ]
            self._cache[key] = found
        return found


def _fmt_minutes(seconds: float) -> str:
    minutes = seconds / 60.0
    if abs(minutes) >= 120:
        return f"{minutes / 60:.1f} h"
    return f"{minutes:.0f} min"


def _slack(study: QueuedStudy, now: float) -> str:
    left = study.deadline - now
    return f"slack {_fmt_minutes(left)}" if left >= 0 else f"overdue {_fmt_minutes(-left)}"


def _eligible_reason(load: _Load, study: QueuedStudy) -> str:
    r = load.reader
    what = study.modality.upper() + (f"-{study.subspecialty}" if study.subspecialty else "")
    parts = []
    if study.jurisdiction:
        lic = next(lic for lic in sorted(r.licences) if licence_covers(lic, study.jurisdiction))
        parts.append(f"licensed {lic}")
    parts.append(f"reads {what}")
    if study.language and r.languages:
        parts.append(f"reports in {study.language}")
    parts.append("on call" if load.status.on_call and not load.status.on_shift else "on shift")
    return f"eligible: {r.key} " + ", ".join(parts)


# -- choosing -----------------------------------------------------------------------------


def _score(load: _Load, study: QueuedStudy, policy: QueuePolicy) -> float:
    """Minutes: projected finish of the study with this reader, adjusted for fairness and
    preference -- except for STAT, where only the earliest finish counts."""
    score = load.finish_minutes(study)
    if study.priority == Priority.STAT:
        if load.interrupted_by(study):
            score += policy.interrupt_penalty_minutes  # only when it saves that much
        return score
    score += policy.fairness_weight * load.utilisation * 60.0
    if not load.status.on_shift:
        score += policy.on_call_penalty_minutes  # only called when it saves that much
    if load.reader.key in study.preferred:
        score -= policy.preferred_bonus_minutes
    return score


def _choose(
    study: QueuedStudy,
    candidates: Sequence[_Load],
    now: float,
    policy: QueuePolicy,
    sticky: Mapping[str, str],
) -> tuple[_Load, str]:
    """The best candidate and why; ``candidates`` is non-empty and sorted by key."""
    if study.patient_key:
        want = sticky.get(study.patient_key)
        if want is not None:
            for load in candidates:
                if load.reader.key == want:
                    finish = now + load.finish_minutes(study) * 60.0
                    if finish <= study.deadline:
                        return load, "chosen: reads this patient's other study (sticky)"
                    break
    pool = candidates
    if study.priority == Priority.STAT:
        # A free reader starts now; a busy one's "almost done" is only an estimate. Free
        # readers who would finish it before its escalation window, on shift first (the
        # on-call reader is woken when nobody on shift is free); else whoever finishes it
        # first, free, busy or setting a case aside.
        safe_by = study.deadline - policy.escalate_s(Priority.STAT)
        safe = [
            c
            for c in candidates
            if c.ahead_of(study.priority) <= 1e-9
            and now + c.finish_minutes(study) * 60.0 <= safe_by
        ]
        on_shift = [c for c in safe if c.status.on_shift]
        if policy.on_call_penalty_minutes > 0 and on_shift:
            pool = on_shift
        elif safe:
            pool = safe
    elif policy.fairness_weight > 0:
        # Several readers free right now: nobody waits whoever takes it, so the one who has
        # worked least lately (fairness), as a reader who pulls work would -- on shift
        # before on call.
        idle = [c for c in candidates if c.ahead_of(study.priority) <= 1e-9]
        on_shift = [c for c in idle if c.status.on_shift]
        if policy.on_call_penalty_minutes > 0 and on_shift:
            idle = on_shift
        if len(idle) > 1:
            best = min(idle, key=lambda c: (round(c.utilisation, 2), _score(c, study, policy)))
            why = f"chosen: free now and least busy lately ({best.utilisation:.0%} of the"
            why += f" last 12 h; {len(idle)} free, {len(candidates)} eligible with room)"
            return best, why
    best = min(pool, key=lambda c: (_score(c, study, policy), c.reader.key))
    minutes = best.finish_minutes(study)
    if study.priority == Priority.STAT:
        why = f"chosen: earliest finish ({minutes:.0f} min of work incl. this study"
        why += f", {len(candidates)} eligible with room)"
        if pool is candidates:
            why += "; nobody free would finish it before the escalation window"
    else:
        why = f"chosen: least projected load ({minutes:.0f} min of work incl. this study"
        why += f", {len(candidates)} eligible with room)"
    if best.reader.key in study.preferred:
        why += "; preferred by the station"
    if not best.status.on_shift:
        why += "; on call: nobody on shift would be as quick"
    if best.interrupted_by(study):
        why += "; they set the case in hand aside for it"
    return best, why


# -- planning -----------------------------------------------------------------------------


def plan(
    now: float,
    studies: Iterable[QueuedStudy],
    readers: Iterable[Reader],
    policy: QueuePolicy,
    *,
    sticky: Mapping[str, str] | None = None,
    explain: bool = False,
    assign: bool = True,
) -> Plan:
    """One push round: releases, escalations, pre-emptive reassignments, then assignments.

    ``studies`` are the open ones (ready, assigned, in progress); ``readers`` carry their load
    from those same studies. ``sticky`` maps a patient key to the reader of their open or
    recent study. ``assign=False`` (pull mode) stops after releases and escalations:
    readers take studies themselves.
    """
    sticky = sticky or {}
    urgency = _key_function(now, policy)
    loads = _loads(readers, now, policy)
    eligibility = _Eligibility(loads, policy)
    out = Plan()
    ready: list[QueuedStudy] = []
    held: list[QueuedStudy] = []
    avoid: dict[str, str] = {}  # uid -> reader who just lost it (not given back this round)

    for st in studies:
        if st.state == StudyState.READY:
            ready.append(st)
        elif st.state in HELD:
            held.append(st)

    # 1. leases, shift ends, deactivation, capacity changes
    by_reader: dict[str, list[QueuedStudy]] = {}
    held.sort(key=lambda st: st.uid)  # the plan must not depend on the input order
    for st in held:
        load = loads.get(st.assignee or "")
        why: str | None = None
        if load is None:
            why = f"released: reader {st.assignee} unknown"
        elif st.lease_expires_at is not None and st.lease_expires_at <= now:
            why = f"released: lease expired {_fmt_minutes(now - st.lease_expires_at)} ago"
        elif st.state == StudyState.ASSIGNED:
            blocked = _static_ineligibility(load.reader, load.status, st, policy)
            if not load.reader.active:
                why = "released: reader deactivated"
            elif blocked in ("off shift",) or (blocked or "").startswith("on call only"):
                why = "released: reader's shift ended"
            elif blocked is not None:
                why = f"released: reader no longer eligible ({blocked})"
        if why is None:
            by_reader.setdefault(st.assignee or "", []).append(st)
            continue
        if load is not None:
            load.remove(st)
        out.decisions.append(Decision(DecisionKind.RELEASE, st.uid, st.assignee, reasons=(why,)))
        avoid[st.uid] = st.assignee or ""
        ready.append(_as_ready(st))
    for key, mine in sorted(by_reader.items()):
        load = loads[key]
        excess = load.count - load.reader.max_concurrent
        if excess <= 0:
            continue
        not_started = [s for s in mine if s.state == StudyState.ASSIGNED]
        not_started.sort(key=urgency, reverse=True)
        for st in not_started[:excess]:
            load.remove(st)
            mine.remove(st)
            reason = f"released: capacity of {key} is {load.reader.max_concurrent}"
            out.decisions.append(Decision(DecisionKind.RELEASE, st.uid, key, reasons=(reason,)))
            avoid[st.uid] = key
            ready.append(_as_ready(st))

    # 2. escalation of studies about to breach
    still_held = [s for group in by_reader.values() for s in group]
    escalate_s = [policy.escalate_s(p) for p in Priority]
    due = [
        st
        for st in (*ready, *still_held)
        if not st.escalated and st.deadline - now <= escalate_s[st.priority]
    ]
    for st in sorted(due, key=urgency):
        left = st.deadline - now
        who = f"held by {st.assignee}" if st.state in HELD else "unassigned"
        when = f"{_fmt_minutes(left)} left" if left >= 0 else f"{_fmt_minutes(-left)} late"
        out.decisions.append(
            Decision(
                DecisionKind.ESCALATE,
                st.uid,
                st.assignee if st.state in HELD else None,
                reasons=(f"escalated: {Priority(st.priority).name} {when}, {who}",),
            )
        )

    if not assign:
        return out

    # 3. pre-emptive reassignment of at-risk studies nobody has opened yet,
    #    4. assignment of ready studies -- in one urgency order
    #: not opened yet, so still movable: at-risk studies, STAT whenever a free reader would
    #: start it clearly sooner, and any study a reader who fell free would finish
    #: ``rebalance_minutes`` sooner (late binding: a push is a promise, not a commitment)
    someone_free = policy.rebalance_minutes > 0 and any(
        ld.in_progress <= 1e-9 and ld.reader.active and (ld.status.on_shift or ld.status.on_call)
        for ld in loads.values()
    )
    at_risk = [
        s
        for s in still_held
        if s.state == StudyState.ASSIGNED
        and (
            someone_free
            or s.priority == Priority.STAT
            or s.deadline - now <= policy.escalate_s(s.priority)
        )
    ]
    queue = sorted([*ready, *at_risk], key=urgency)
    free = sum(
        max(0, ld.reader.max_concurrent - ld.count)
        for ld in loads.values()
        if ld.reader.active and (ld.status.on_shift or ld.status.on_call)
    )
    passed_over: list[QueuedStudy] = []
    #: unopened non-STAT studies each reader held at the start of the round and still holds:
    #: one of them may make room for a STAT on a reader at capacity
    movable = {
        key: [s for s in mine if s.state == StudyState.ASSIGNED and s.priority != Priority.STAT]
        for key, mine in by_reader.items()
    }
    room_made: set[str] = set()
    #: with no slot left, only a STAT can still be placed (by making room)
    last_stat = max(
        (i for i, s in enumerate(queue) if s.priority == Priority.STAT),
        default=-1,
    )
    for i, st in enumerate(queue):
        if st.uid in room_made:
            continue  # moved off a full reader for a STAT already
        if free <= 0 and st.state == StudyState.READY and not explain:
            if i > last_stat or not any(movable.values()):
                break
            if st.priority != Priority.STAT:
                passed_over.append(st)
                continue
        candidates = [
            ld
            for ld in eligibility.readers_for(st)
            if ld.reader.key != avoid.get(st.uid)
            and ld.reader.key != st.assignee
            and ld.has_room(st, policy)
        ]
        if st.priority == Priority.STAT and st.state == StudyState.READY and any(movable.values()):
            stat_key = urgency(st)
            # full readers and what may move off them for it: unopened, less urgent than it
            # and not at risk itself
            for_it: dict[str, list[QueuedStudy]] = {}
            full = []
            for ld in eligibility.readers_for(st):  # sorted by key
                theirs = movable.get(ld.reader.key)
                if not theirs or ld.count < ld.reader.max_concurrent:
                    continue
                if ld.reader.key == avoid.get(st.uid) or not ld.in_time(st, policy):
                    continue
                ms = [
                    m
                    for m in theirs
                    if urgency(m) > stat_key and m.deadline - now > policy.escalate_s(m.priority)
                ]
                if ms:
                    for_it[ld.reader.key] = ms
                    full.append(ld)
            if full:
                made = _make_room(
                    st, candidates, full, for_it, movable, eligibility, now, policy, sticky, out
                )
                if made is not None:
                    moved, took_slot = made
                    room_made.add(moved)
                    free -= took_slot
                    continue
        if st.state == StudyState.ASSIGNED:
            if _reassign(st, candidates, loads, now, policy, sticky, out):
                mine = movable.get(st.assignee or "", [])
                if st in mine:
                    mine.remove(st)
                # the slot it freed goes to the most urgent study passed over so far
                for earlier in list(passed_over):
                    again = [
                        ld
                        for ld in eligibility.readers_for(earlier)
                        if ld.reader.key != avoid.get(earlier.uid) and ld.has_room(earlier, policy)
                    ]
                    if _assign(earlier, again, now, policy, sticky, out):
                        passed_over.remove(earlier)
                        free -= 1
            continue
        if not _assign(st, candidates, now, policy, sticky, out):
            passed_over.append(st)
            continue
        free -= 1
    if explain:
        assigned = {d.study_uid for d in out.decisions if d.kind is DecisionKind.ASSIGN}
        for st in passed_over:
            if st.uid not in assigned:
                out.waiting[st.uid] = _why_waiting(st, loads, policy)
    return out


def _make_room(
    st: QueuedStudy,
    candidates: list[_Load],
    full: list[_Load],
    for_it: Mapping[str, list[QueuedStudy]],
    movable: dict[str, list[QueuedStudy]],
    eligibility: _Eligibility,
    now: float,
    policy: QueuePolicy,
    sticky: Mapping[str, str],
    out: Plan,
) -> tuple[str, int] | None:
    """A STAT whose best reader is at capacity: the least urgent of their unopened studies
    that may move for it (``for_it``: less urgent than the STAT, not at risk) goes to another
    reader with room (or back to the pool) and the STAT takes its place -- when nobody has
    room for the STAT, or when that reader would finish it ``STAT_MOVE_MARGIN_S`` before
    anyone with room and the best of those would only finish it inside its escalation
    window. Returns the uid moved and the slots it took elsewhere (1 or 0); None: nothing
    done (the caller assigns as usual)."""
    best, why = _choose(st, [*candidates, *full], now, policy, sticky)
    if not any(best is ld for ld in full):
        return None
    why = why.replace(" eligible with room", f" eligible, {len(full)} of them full")
    if candidates:
        # minutes until the STAT is done: with them (an interruption counts its penalty), and
        # with the quickest reader who has room
        def finish(c: _Load) -> float:
            penalty = policy.interrupt_penalty_minutes if c.interrupted_by(st) else 0.0
            return c.finish_minutes(st) + penalty

        quickest = min(candidates, key=lambda c: (finish(c), c.reader.key))
        if finish(best) + STAT_MOVE_MARGIN_S / 60.0 >= finish(quickest):
            return None
        if now + quickest.finish_minutes(st) * 60.0 <= st.deadline - policy.escalate_s(
            Priority.STAT
        ):
            return None  # no need
    urgency = _key_function(now, policy)
    key = best.reader.key
    moving = max(for_it[key], key=urgency)
    movable[key].remove(moving)
    best.remove(moving)
    reason = f"moved: makes room on {key} for STAT {st.uid}"
    takers = [
        ld
        for ld in eligibility.readers_for(moving)
        if ld is not best and ld.has_room(moving, policy)
    ]
    took_slot = 0
    if takers:
        took_slot = 1
        to, to_why = _choose(moving, takers, now, policy, sticky)
        to.add(moving)
        out.decisions.append(
            Decision(
                DecisionKind.REASSIGN,
                moving.uid,
                to.reader.key,
                previous=key,
                reasons=(reason, _eligible_reason(to, moving), to_why, _slack(moving, now)),
                lease_expires_at=now + policy.lease_s(moving.priority),
            )
        )
    else:
        out.decisions.append(Decision(DecisionKind.RELEASE, moving.uid, key, reasons=(reason,)))
    _give(best, st, why, now, policy, out)
    return moving.uid, took_slot


def _assign(
    st: QueuedStudy,
    candidates: list[_Load],
    now: float,
    policy: QueuePolicy,
    sticky: Mapping[str, str],
    out: Plan,
) -> bool:
    if not candidates:
        return False
    best, why = _choose(st, candidates, now, policy, sticky)
    _give(best, st, why, now, policy, out)
    return True


def _give(
    best: _Load, st: QueuedStudy, why: str, now: float, policy: QueuePolicy, out: Plan
) -> None:
    """Assign ready ``st`` to ``best`` (chosen for ``why``)."""
    aside = best.interrupted_by(st)  # before it is added to their list
    best.add(st)
    out.decisions.append(
        Decision(
            DecisionKind.ASSIGN,
            st.uid,
            best.reader.key,
            reasons=(_eligible_reason(best, st), why, _slack(st, now)),
            lease_expires_at=now + policy.lease_s(st.priority),
            sets_aside=aside,
        )
    )


def _reassign(
    st: QueuedStudy,
    candidates: list[_Load],
    loads: Mapping[str, _Load],
    now: float,
    policy: QueuePolicy,
    sticky: Mapping[str, str],
    out: Plan,
) -> bool:
    """Move an unopened study: at risk, to whoever finishes it first if that beats its reader;
    otherwise to a free reader who would finish it clearly sooner (STAT: 2 min; others:
    ``rebalance_minutes``)."""
    if not candidates:
        return False
    current = loads[st.assignee or ""]
    finish_now = now + current.finish_minutes(st, own=True) * 60.0

    def finish(c: _Load) -> float:
        return now + c.finish_minutes(st) * 60.0

    risky = st.deadline - now <= policy.escalate_s(st.priority)
    if risky and finish_now > st.deadline:
        best = min(candidates, key=lambda c: (finish(c), c.reader.key))
        if finish(best) >= finish_now:
            return False
        why = f"chosen: earliest finish ({_fmt_minutes(finish(best) - now)} from now)"
        reason = (
            f"reassigned: {st.assignee} would finish "
            f"{_fmt_minutes(finish_now - st.deadline)} after the deadline"
        )
    else:
        idle = [c for c in candidates if c.ahead_of(st.priority) <= 1e-9]
        if st.priority == Priority.STAT:
            margin = STAT_MOVE_MARGIN_S
        elif policy.rebalance_minutes > 0:
            margin = policy.rebalance_minutes * 60.0
        else:
            return False
        if not idle:
            return False
        best, why = _choose(st, idle, now, policy, sticky)
        if finish(best) + margin >= finish_now:
            return False
        reason = (
            f"reassigned: {best.reader.key} is free and would finish "
            f"{_fmt_minutes(finish_now - finish(best))} sooner than {st.assignee}"
        )
    current.remove(st)
    aside = best.interrupted_by(st)
    best.add(st)
    out.decisions.append(
        Decision(
            DecisionKind.REASSIGN,
            st.uid,
            best.reader.key,
            previous=st.assignee,
            reasons=(reason, _eligible_reason(best, st), why, _slack(st, now)),
            lease_expires_at=now + policy.lease_s(st.priority),
            sets_aside=aside,
        )
    )
    return True


def _as_ready(st: QueuedStudy) -> QueuedStudy:
    return replace(st, state=StudyState.READY, assignee=None, lease_expires_at=None)


def _why_waiting(st: QueuedStudy, loads: Mapping[str, _Load], policy: QueuePolicy) -> str:
    if not loads:
        return "no radiologists"
    reasons: dict[str, int] = {}
    for load in loads.values():
        why = _static_ineligibility(load.reader, load.status, st, policy)
        if why is None:
            why = load.why_no_room(st, policy)
        reasons[why] = reasons.get(why, 0) + 1
    return "waiting: " + "; ".join(f"{n} {why}" for why, n in sorted(reasons.items()))


def next_for(
    now: float,
    reader_key: str,
    studies: Iterable[QueuedStudy],
    readers: Iterable[Reader],
    policy: QueuePolicy,
) -> Decision | None:
    """Pull mode: the most urgent ready study ``reader_key`` may read, if they have room.

    A pull takes from the common pool in the order a push round would (no stickiness: the
    reader asked for work, and the patient's other reader may not be asking).
    """
    choices = pull_choices(now, reader_key, studies, readers, policy, limit=1)
    return choices[0] if choices else None


def pull_choices(
    now: float,
    reader_key: str,
    studies: Iterable[QueuedStudy],
    readers: Iterable[Reader],
    policy: QueuePolicy,
    *,
    limit: int | None = None,
) -> list[Decision]:
    """Pull mode, every acceptable answer: the ready studies ``reader_key`` may take now,
    most urgent first, each as the decision a claim would make; ``next_for`` is the first.
    Claimers racing each other for the head of the queue take the first one nobody else
    has taken, which is the one the engine would choose once the others are gone (one
    claim adds one study, so the reader's room is the same for every choice)."""
    loads = _loads(readers, now, policy)
    load = loads.get(reader_key)
    if load is None:
        return []
    ready = [s for s in studies if s.state == StudyState.READY]
    ready.sort(key=_key_function(now, policy))
    out: list[Decision] = []
    for st in ready:
        if _static_ineligibility(load.reader, load.status, st, policy) is not None:
            continue
        if not load.has_room(st, policy):
            if load.count >= load.reader.max_concurrent:
                return []
            continue
        slack = _slack(st, now)
        out.append(
            Decision(
                DecisionKind.ASSIGN,
                st.uid,
                reader_key,
                reasons=(
                    _eligible_reason(load, st),
                    "chosen: most urgent study they may read",
                    slack,
                ),
                lease_expires_at=now + policy.lease_s(st.priority),
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return out


def gini(values: Sequence[float]) -> float:
    """Gini coefficient of non-negative values (0: all equal, towards 1: one does all)."""
    xs = sorted(v for v in values if not math.isnan(v))
    n = len(xs)
    total = sum(xs)
    if n == 0 or total <= 0:
        return 0.0
    cum = sum((i + 1) * x for i, x in enumerate(xs))
    return (2.0 * cum) / (n * total) - (n + 1.0) / n
