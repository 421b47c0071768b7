"""A discrete-event simulation of a reading day, to compare assignment strategies.

The question an admin asks is "does this roster keep our SLAs next week?", and the question
the engine's author asks is "is push-by-engine better than what sites do today?". Both are
answered the same way: replay one set of arrivals (a CSV of real or planned studies, or a
seeded synthetic day) against one roster under each strategy, with the same reading-time
draw per study, and compare turnaround, SLA breaches, the longest routine wait and how evenly
the work is spread.

Strategies:

``telerad``
    the pure engine (:func:`reading_queue.worklist.engine.plan`) run at every event and every
    :data:`TICK_S` seconds, its decisions applied as the hub's worklist would; each reader
    holds up to ``max_concurrent`` studies and reads the most urgent of them next.
``fifo_pull``
    a shared worklist sorted by arrival: a free reader takes the oldest study they may read,
    whatever its priority.
``round_robin``
    each arrival is pushed to the next eligible reader in rotation, whatever their load; they
    read their own list in arrival order, and what they have not started when their shift
    ends is dealt out again.

All three obey the same eligibility (the engine's: licence, modality, subspecialty, language,
station exclusions, shift and on-call rules) and the same reading model: one study at a time,
started only while on shift (on call: only the priorities the policy sends to on-call
readers), finished even after the shift ends.

No patient names or IDs leave this module: patients become opaque hashes before the engine
sees them, and errors name files, lines and columns, never values from the patient column.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from reading_queue import QueueError
from reading_queue.worklist.engine import (
    FAIRNESS_WINDOW_S,
    Decision,
    DecisionKind,
    QueuedStudy,
    Reader,
    ShiftStatus,
    StudyState,
    gini,
    ineligibility,
    plan,
    remaining_rvu,
    shift_status,
    urgency_key,
)
from reading_queue.worklist.policy import PRIORITY_NAMES, QueuePolicy
from reading_queue.worklist.roster import Roster, StationSpec
from telerad.core.priority import Priority

__all__ = [
    "STRATEGIES",
    "Arrival",
    "ArrivalsError",
    "ClassStats",
    "Reading",
    "Report",
    "SimResult",
    "SimulationError",
    "compare",
    "dump_json",
    "eligibility",
    "load_arrivals",
    "simulate",
    "synthetic_day",
]

STRATEGIES = ("telerad", "fifo_pull", "round_robin")
#: the engine also runs on a clock, not only on events, so leases/escalations/ageing are seen
TICK_S = 300.0
#: spread of reading times around RVU / rate (lognormal, mean 1)
NOISE_SIGMA = 0.35
#: what setting a case aside for a STAT costs it: finding one's place again when resuming
RESUME_S = 120.0
#: give up this long after the last arrival (a roster that cannot read something at all)
HARD_STOP_S = 48 * 3600.0
#: the hub's fairness window (reading_queue.worklist.service: RVU reported in the last 12 h)
RECENT_WORK_S = FAIRNESS_WINDOW_S
#: where the synthetic day's morning peak is measured (most stations are in Vietnam)
PEAK_TZ = "Asia/Ho_Chi_Minh"
#: synthetic volume: mean studies per station per day (~1,350 from 150 stations), chosen so
#: the example roster runs at roughly 80 % utilisation (see docs/worklist-simulation.md)
STUDIES_PER_STATION = 9.0

#: relative arrival rate by local hour (linear between the points); normalised to mean 1
_DAY_PROFILE: tuple[tuple[float, float], ...] = (
    (0, 0.35),
    (5, 0.35),
    (6, 0.7),
    (7, 1.6),
    (8, 2.1),
    (9, 2.2),
    (10, 2.1),
    (11, 1.6),
    (12, 1.2),
    (13, 1.4),
    (15, 1.3),
    (16, 1.2),
    (17, 0.9),
    (19, 0.7),
    (21, 0.5),
    (23, 0.4),
    (24, 0.35),
)
_CT_PARTS = (("HEAD", 0.40), ("CHEST", 0.25), ("ABDOMEN", 0.25), ("WHOLEBODY", 0.10))
_CR_PARTS = (
    ("CHEST", 0.65),
    ("KNEE", 0.06),
    ("HAND", 0.05),
    ("ANKLE", 0.05),
    ("SHOULDER", 0.05),
    ("FOOT", 0.04),
    ("LSPINE", 0.06),
    ("PELVIS", 0.04),
)
_CSV_REQUIRED = ("time", "station", "modality", "body_part", "priority")
_CSV_OPTIONAL = ("patient", "read_minutes")


class SimulationError(QueueError):
    """The simulation cannot run on this input (unknown station, empty roster, ...)."""


class ArrivalsError(SimulationError):
    """A bad arrivals file; the message names the file and line."""


@dataclass
class Arrival:
    """One study as it reaches the hub: when, from where, what, and how urgent."""

    at: float
    station: str
    modality: str
    body_part: str
    priority: int
    #: only ever hashed (stickiness); empty: a patient seen once
    patient: str = ""
    #: a fixed reading time (minutes) for every reader; None: from RVU and reader speed
    read_minutes: float | None = None
    #: names the study in the results; empty: ``a00001``... by position in the input
    uid: str = ""


# ---------------------------------------------------------------------------- arrivals file


def _parse_priority(text: str) -> int:
    return int(Priority.parse(text.strip()))


def load_arrivals(path: Path | str, roster: Roster | None = None) -> list[Arrival]:
    """Read an arrivals CSV (documented in docs/worklist-simulation.md), sorted by time.

    Every problem is reported as an :class:`ArrivalsError` naming ``file:line`` so an admin
    can fix the file without reading a traceback. With ``roster``, stations the roster does
    not know are rejected here too.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ArrivalsError(f"cannot read arrivals {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ArrivalsError(f"{path}: not UTF-8 text") from None
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader)
    except StopIteration:
        raise ArrivalsError(f"{path}: empty file (expected a header line)") from None
    except csv.Error as exc:
        raise ArrivalsError(f"{path}:1: {exc}") from None
    columns = [h.strip().lower() for h in header]
    missing = [c for c in _CSV_REQUIRED if c not in columns]
    unknown = [c for c in columns if c not in _CSV_REQUIRED + _CSV_OPTIONAL]
    if missing or unknown:
        want = ",".join(_CSV_REQUIRED) + "[,patient][,read_minutes]"
        bits = []
        if missing:
            bits.append(f"missing {', '.join(missing)}")
        if unknown:
            bits.append(f"unknown {', '.join(unknown)}")
        raise ArrivalsError(f"{path}:1: bad header ({'; '.join(bits)}); expected {want}")
    if len(set(columns)) != len(columns):
        raise ArrivalsError(f"{path}:1: a column is named twice")
    known = {s.name for s in roster.stations} if roster is not None else None
    out: list[Arrival] = []
    line = 1
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if row[0].lstrip().startswith("#"):
                continue
            if len(row) != len(columns):
                raise ArrivalsError(
                    f"{path}:{line}: {len(row)} fields, the header has {len(columns)}"
                )
            out.append(_arrival_row(dict(zip(columns, row, strict=True)), path, line, known))
    except csv.Error as exc:
        raise ArrivalsError(f"{path}:{line}: {exc}") from None
    if not out:
        raise ArrivalsError(f"{path}: no arrivals after the header")
    out.sort(key=lambda a: a.at)
    return out


def _arrival_row(cells: dict[str, str], path: Path, line: int, known: set[str] | None) -> Arrival:
    where = f"{path}:{line}"
    raw_time = cells["time"].strip()
    try:
        when = datetime.fromisoformat(raw_time)
    except ValueError:
        raise ArrivalsError(
            f"{where}: time {raw_time!r} is not ISO 8601 (e.g. 2026-11-23T07:12:00+07:00)"
        ) from None
    if when.tzinfo is None:
        raise ArrivalsError(f"{where}: time {raw_time!r} needs a UTC offset, e.g. +07:00")
    station = cells["station"].strip()
    if not station:
        raise ArrivalsError(f"{where}: station is empty")
    if known is not None and station not in known:
        raise ArrivalsError(f"{where}: station {station!r} is not in the roster")
    modality = cells["modality"].strip().upper()
    if not modality or not modality.isalnum() or len(modality) > 16:
        raise ArrivalsError(f"{where}: modality {modality!r} is not a DICOM modality (CR, CT)")
    try:
        priority = _parse_priority(cells["priority"])
    except ValueError:
        raise ArrivalsError(
            f"{where}: priority {cells['priority'].strip()!r}: use stat, urgent or routine"
        ) from None
    minutes: float | None = None
    raw_minutes = cells.get("read_minutes", "").strip()
    if raw_minutes:
        try:
            minutes = float(raw_minutes)
        except ValueError:
            minutes = math.nan
        if not math.isfinite(minutes) or minutes <= 0:
            raise ArrivalsError(f"{where}: read_minutes {raw_minutes!r} must be a positive number")
    return Arrival(
        at=when.timestamp(),
        station=station,
        modality=modality,
        body_part=cells["body_part"].strip().upper(),
        priority=priority,
        patient=cells.get("patient", "").strip(),
        read_minutes=minutes,
        uid=f"{path.stem}:{line}",
    )


# ---------------------------------------------------------------------------- synthetic day


def _profile_at(hour: float) -> float:
    for (h0, v0), (h1, v1) in pairwise(_DAY_PROFILE):
        if h0 <= hour <= h1:
            return v0 + (v1 - v0) * (hour - h0) / (h1 - h0)
    return _DAY_PROFILE[-1][1]


def _profile_mean() -> float:
    area = sum((h1 - h0) * (v0 + v1) / 2 for (h0, v0), (h1, v1) in pairwise(_DAY_PROFILE))
    return area / 24.0


def _pick(rng: random.Random, table: Sequence[tuple[str, float]]) -> str:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


def synthetic_day(
    roster: Roster,
    *,
    seed: int,
    start: datetime,
    stations: int = 150,
    hours: float = 24.0,
    studies_per_station: float = STUDIES_PER_STATION,
    follow_up: float = 0.12,
    timezone: str = PEAK_TZ,
) -> list[Arrival]:
    """A seeded day of arrivals from the roster's first ``stations`` stations.

    Non-homogeneous Poisson arrivals (thinning) with a morning peak (about twice the daily
    mean from 7 to 11 local time in ``timezone``) and a quiet night; stations differ in size
    (lognormal weights). 70 % CR / 30 % CT, 10 % STAT, 15 % URGENT, drawn independently.
    ``follow_up`` of the studies are a patient's second study at the same station, so the
    engine's stickiness has something to do. With fewer stations in the roster, all are used
    and the volume shrinks with them (``studies_per_station`` is per station and day).
    """
    if start.tzinfo is None:
        raise ValueError("start needs a time zone (e.g. +07:00)")
    if not roster.stations:
        raise SimulationError("the roster has no stations to send studies")
    if hours <= 0 or studies_per_station <= 0:
        raise ValueError("hours and studies_per_station must be positive")
    rng = random.Random(f"telerad-synthetic-day:{seed}")
    chosen: list[StationSpec] = roster.stations[: max(1, stations)]
    weights = [rng.lognormvariate(0.0, 0.5) for _ in chosen]
    zone = ZoneInfo(timezone)
    t0 = start.timestamp()
    t_end = t0 + hours * 3600.0
    mean_rate = len(chosen) * studies_per_station / 86400.0  # studies per second, daily mean
    norm = _profile_mean()
    peak = max(v for _, v in _DAY_PROFILE) / norm
    lam_max = mean_rate * peak
    out: list[Arrival] = []
    by_station: dict[str, list[str]] = {}
    next_patient = 0
    t = t0
    while True:
        t += rng.expovariate(lam_max)
        if t >= t_end:
            break
        local = datetime.fromtimestamp(t, zone)
        hour = local.hour + local.minute / 60.0 + local.second / 3600.0
        if rng.random() * peak > _profile_at(hour) / norm:
            continue  # thinned away
        station = rng.choices(chosen, weights=weights)[0]
        if rng.random() < 0.70:
            modality, part = "CR", _pick(rng, _CR_PARTS)
        else:
            modality, part = "CT", _pick(rng, _CT_PARTS)
        u = rng.random()
        priority = Priority.STAT if u < 0.10 else Priority.URGENT if u < 0.25 else Priority.ROUTINE
        seen = by_station.setdefault(station.name, [])
        if seen and rng.random() < follow_up:
            patient = rng.choice(seen)
        else:
            next_patient += 1
            patient = f"SYN{seed}-{next_patient:06d}"
            seen.append(patient)
        out.append(
            Arrival(
                at=round(t, 3),
                station=station.name,
                modality=modality,
                body_part=part,
                priority=int(priority),
                patient=patient,
                uid=f"syn{seed}-{len(out) + 1:05d}",
            )
        )
    return out


# ---------------------------------------------------------------------------- eligibility


def eligibility(
    reader: Reader, status: ShiftStatus, study: QueuedStudy, policy: QueuePolicy
) -> str | None:
    """Why ``reader`` may not start ``study`` now (None: they may).

    Every strategy goes through this one check so none of them wins by reading what the
    others may not; it wraps the engine's private check until the engine exposes one.
    """
    return ineligibility(reader, study, 0.0, policy, status=status)


# ---------------------------------------------------------------------------- results


@dataclass
class Reading:
    """One study read: by whom and when (epoch seconds)."""

    uid: str
    reader: str
    priority: int
    started: float
    finished: float
    #: (from, to) while the reader had it set aside for a STAT; each cost it ``RESUME_S``
    set_aside: tuple[tuple[float, float], ...] = ()


@dataclass
class ClassStats:
    """Outcome of one priority class; minutes; ``None`` where unread studies make it infinite."""

    count: int
    read: int
    p50_min: float | None
    p95_min: float | None
    breaches: int
    breach_rate: float
    longest_wait_min: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "read": self.read,
            "p50_min": _r(self.p50_min),
            "p95_min": _r(self.p95_min),
            "breaches": self.breaches,
            "breach_rate": round(self.breach_rate, 5),
            "longest_wait_min": _r(self.longest_wait_min),
        }


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class SimResult:
    strategy: str
    classes: dict[str, ClassStats]
    #: reading minutes / available minutes over the arrival window, all readers
    utilisation: float
    #: Gini of per-reader utilisation (readers with available time in the window)
    gini: float
    reader_utilisation: dict[str, float]
    readings: list[Reading]
    #: uids never read before the simulation stopped
    unread: list[str]
    #: turnaround minutes of the studies read, per class name (for plots)
    turnarounds: dict[str, list[float]]
    escalations: int = 0
    reassignments: int = 0
    releases: int = 0
    ignored_decisions: int = 0
    #: cases readers set aside for a STAT
    interruptions: int = 0
    #: epoch seconds when the last study was read (or the hard stop)
    ended_at: float = 0.0
    #: most studies each reader held at once (in hand + assigned to them)
    peak_held: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": {k: v.to_json() for k, v in self.classes.items()},
            "utilisation": round(self.utilisation, 5),
            "gini": round(self.gini, 5),
            "reader_utilisation": {k: round(v, 4) for k, v in self.reader_utilisation.items()},
            "read": len(self.readings),
            "unread": len(self.unread),
            "escalations": self.escalations,
            "reassignments": self.reassignments,
            "releases": self.releases,
            "ignored_decisions": self.ignored_decisions,
            "interruptions": self.interruptions,
            "ended_at": datetime.fromtimestamp(self.ended_at, ZoneInfo(PEAK_TZ)).isoformat(
                timespec="seconds"
            ),
        }


# ---------------------------------------------------------------------------- the model


class _Study:
    """A study during the run; ``qs`` is the engine's view, rebuilt only on change."""

    __slots__ = (
        "arrival",
        "assignee",
        "deadline",
        "escalated",
        "finished",
        "idx",
        "left_s",
        "noise",
        "patient_key",
        "priority",
        "profile",
        "qs",
        "rvu",
        "set_aside",
        "started",
        "state",
    )

    def __init__(
        self,
        idx: int,
        arrival: Arrival,
        station: StationSpec,
        policy: QueuePolicy,
        noise: float,
    ) -> None:
        self.idx = idx
        self.arrival = arrival
        self.priority = arrival.priority
        subspecialty, self.rvu = policy.classify(arrival.modality, arrival.body_part)
        self.deadline = arrival.at + policy.sla_s(arrival.priority, station.sla_minutes)
        self.noise = noise
        self.patient_key = _patient_key(arrival.patient)
        self.state = StudyState.READY
        self.assignee: str | None = None
        self.started: float | None = None
        self.finished: float | None = None
        #: reading time still to do on a case set aside for a STAT
        self.left_s = 0.0
        #: (from, to) of each time it was set aside (to: when it was resumed)
        self.set_aside: list[tuple[float, float]] = []
        self.escalated = False
        self.qs = QueuedStudy(
            uid=arrival.uid,
            priority=arrival.priority,
            modality=arrival.modality.upper(),
            received_at=arrival.at,
            deadline=self.deadline,
            rvu=self.rvu,
            jurisdiction=station.jurisdiction,
            language=station.language,
            subspecialty=subspecialty,
            station=station.name,
            patient_key=self.patient_key,
            preferred=frozenset(station.preferred),
            excluded=frozenset(station.excluded),
        )
        #: what eligibility depends on besides the reader and their status
        self.profile = (
            self.qs.modality,
            subspecialty,
            station.jurisdiction,
            station.language,
            self.qs.excluded,
            policy.on_call_takes(arrival.priority),
        )

    def set(self, state: StudyState, assignee: str | None) -> None:
        self.state = state
        self.assignee = assignee
        self.qs = replace(
            self.qs, state=state, assignee=assignee, escalated=self.escalated, lease_expires_at=None
        )


def _patient_key(patient: str) -> str:
    if not patient:
        return ""
    return hashlib.sha256(b"telerad-sim\0" + patient.encode()).hexdigest()[:24]


def _noise(seed: int, uid: str) -> float:
    """Per study, not per reader or strategy: every strategy faces the same hard cases."""
    rng = random.Random(f"telerad-sim-noise:{seed}:{uid}")
    return rng.lognormvariate(-(NOISE_SIGMA**2) / 2.0, NOISE_SIGMA)


class _Desk:
    """A radiologist during the run."""

    __slots__ = (
        "avail_s",
        "base",
        "boundaries",
        "busy_s",
        "done_log",
        "free_since",
        "hand_seq",
        "held",
        "in_hand",
        "interruptions",
        "key",
        "paused",
        "peak_held",
        "status",
        "valid_until",
    )

    def __init__(self, base: Reader, boundaries: list[float]) -> None:
        self.base = base
        self.key = base.key
        self.boundaries = boundaries
        self.status = ShiftStatus(False, False)
        self.valid_until = -math.inf
        self.in_hand: _Study | None = None
        #: completion entry of the case in hand (an interrupted case's entry is void)
        self.hand_seq = 0
        #: cases set aside for a STAT, resumed last-in first
        self.paused: list[_Study] = []
        self.interruptions = 0
        #: studies assigned to them and not started (telerad, round robin)
        self.held: list[_Study] = []
        self.busy_s = 0.0
        self.avail_s = 0.0
        self.free_since = -math.inf
        #: (finished at, rvu) for the fairness window
        self.done_log: list[tuple[float, float]] = []
        #: most studies held at once (in hand + assigned): the capacity check of the tests
        self.peak_held = 0

    def note_held(self) -> None:
        n = len(self.held) + len(self.paused) + (self.in_hand is not None)
        self.peak_held = max(self.peak_held, n)

    def refresh(self, now: float) -> bool:
        """Update the shift status if a boundary was crossed; True when it changed."""
        if now < self.valid_until:
            return False
        old = self.status
        self.status = shift_status(self.base, now)
        i = bisect_right(self.boundaries, now)
        self.valid_until = self.boundaries[i] if i < len(self.boundaries) else math.inf
        return old != self.status

    @property
    def working(self) -> bool:
        return self.base.active and (self.status.on_shift or self.status.on_call)

    def recent_rvu(self, now: float) -> float:
        cutoff = now - RECENT_WORK_S
        while self.done_log and self.done_log[0][0] <= cutoff:
            self.done_log.pop(0)
        return sum(r for _, r in self.done_log)


def _boundaries(reader: Reader, t0: float, t1: float) -> list[float]:
    """Epoch seconds where the reader's shift windows start or end in [t0, t1]."""
    zone = ZoneInfo(reader.timezone)
    first = datetime.fromtimestamp(t0, zone).replace(hour=0, minute=0, second=0, microsecond=0)
    out: set[float] = set()
    day = first - timedelta(days=2)
    while day.timestamp() <= t1 + 86400.0:
        for sh in reader.shifts:
            if sh.weekday != day.weekday():
                continue
            a = day.replace(hour=sh.start.hour, minute=sh.start.minute)
            b = day.replace(hour=sh.end.hour, minute=sh.end.minute)
            if b <= a:
                b += timedelta(days=1)
            out.update(x.timestamp() for x in (a, b))
        day = (day + timedelta(days=1, hours=3)).replace(hour=0)  # safe across DST
    return sorted(x for x in out if t0 <= x <= t1)


class _Sim:
    def __init__(
        self,
        roster: Roster,
        arrivals: Sequence[Arrival],
        policy: QueuePolicy,
        strategy: str,
        seed: int,
    ) -> None:
        if strategy not in STRATEGIES:
            raise SimulationError(f"unknown strategy {strategy!r}: use {', '.join(STRATEGIES)}")
        if not roster.radiologists:
            raise SimulationError("the roster has no radiologists")
        if not arrivals:
            raise SimulationError("no arrivals to simulate")
        self.policy = policy
        self.strategy = strategy
        stations = {s.name: s for s in roster.stations}
        unknown = sorted({a.station for a in arrivals} - stations.keys())
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise SimulationError(
                f"arrivals from stations the roster does not list: {', '.join(unknown[:5])}{more}"
            )
        ordered = sorted(enumerate(arrivals), key=lambda ia: (ia[1].at, ia[0]))
        self.studies: list[_Study] = []
        seen: set[str] = set()
        for n, (i, a) in enumerate(ordered):
            if not a.uid:
                a = replace(a, uid=f"a{i + 1:05d}")
            if a.uid in seen:
                raise SimulationError(f"two arrivals share the uid {a.uid!r}")
            seen.add(a.uid)
            self.studies.append(_Study(n, a, stations[a.station], policy, _noise(seed, a.uid)))
        self.t0 = self.studies[0].arrival.at
        self.t_last = self.studies[-1].arrival.at
        self.hard_stop = self.t_last + HARD_STOP_S
        self.desks = [
            _Desk(base, _boundaries(base, self.t0, self.hard_stop))
            for base in sorted((spec.reader() for spec in roster.radiologists), key=lambda r: r.key)
        ]
        self.by_key = {d.key: d for d in self.desks}
        self.open: dict[str, _Study] = {}  # uid -> not yet read
        self.ready: dict[str, _Study] = {}  # uid -> in the pool (fifo/rr: insertion = arrival)
        self.readings: list[Reading] = []
        self.sticky: dict[str, str] = {}
        self.rr_next = 0
        self.escalations = self.reassignments = self.releases = self.ignored = 0
        self._elig: dict[tuple[object, ...], bool] = {}
        self._seq = 0
        self.completions: list[tuple[float, int, str]] = []

    # -- the reading model ------------------------------------------------------------------

    def may_start(self, desk: _Desk, st: _Study) -> bool:
        status = desk.status
        key = (desk.key, status.on_shift, status.on_call, st.profile)
        ok = self._elig.get(key)
        if ok is None:
            ok = eligibility(desk.base, status, st.qs, self.policy) is None
            self._elig[key] = ok
        return ok

    def read_s(self, desk: _Desk, st: _Study) -> float:
        if st.arrival.read_minutes is not None:
            return st.arrival.read_minutes * 60.0
        return st.rvu / desk.base.rvu_per_hour * 3600.0 * st.noise

    def start(self, desk: _Desk, st: _Study, now: float) -> None:
        if st in desk.held:
            desk.held.remove(st)
        self.ready.pop(st.arrival.uid, None)
        st.started = now
        st.set(StudyState.IN_PROGRESS, desk.key)
        if st.patient_key:
            self.sticky[st.patient_key] = desk.key
        desk.in_hand = st
        desk.note_held()
        self._hand(desk, now + self.read_s(desk, st))

    def _hand(self, desk: _Desk, done_at: float) -> None:
        self._seq += 1
        desk.hand_seq = self._seq
        heapq.heappush(self.completions, (done_at, self._seq, desk.key))

    def _done_at(self, desk: _Desk) -> float:
        return next(t for t, seq, _ in self.completions if seq == desk.hand_seq)

    def must_interrupt(self, desk: _Desk, st: _Study) -> bool:
        """A reader sets the case in hand aside for a STAT when finishing it first would
        finish the STAT within its escalation window (they know how far they are; the
        STAT's length they can only expect)."""
        expected = (
            st.arrival.read_minutes * 60.0
            if st.arrival.read_minutes is not None
            else st.rvu / desk.base.rvu_per_hour * 3600.0
        )
        window = self.policy.escalate_s(Priority.STAT)
        return self._done_at(desk) + expected > st.deadline - window

    def interrupt(self, desk: _Desk, st: _Study, now: float) -> None:
        """The reader sets the case in hand aside (it stays theirs) and starts the STAT."""
        hand = desk.in_hand
        assert hand is not None
        hand.left_s = self._done_at(desk) - now + RESUME_S
        hand.set_aside.append((now, math.inf))
        desk.paused.append(hand)
        desk.interruptions += 1
        desk.in_hand = None
        desk.hand_seq = 0  # its completion entry is void
        self.start(desk, st, now)

    def resume(self, desk: _Desk, now: float) -> None:
        st = desk.paused.pop()
        desk.in_hand = st
        st.set_aside[-1] = (st.set_aside[-1][0], now)
        self._hand(desk, now + st.left_s)

    def finish(self, desk: _Desk, now: float) -> None:
        st = desk.in_hand
        assert st is not None and st.started is not None
        desk.in_hand = None
        desk.free_since = now
        desk.done_log.append((now, st.rvu))
        st.finished = now
        st.state = StudyState.FINAL
        del self.open[st.arrival.uid]
        self.readings.append(
            Reading(st.arrival.uid, desk.key, st.priority, st.started, now, tuple(st.set_aside))
        )

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> SimResult:
        boundary_times = sorted({b for d in self.desks for b in d.boundaries})
        bi = 0
        ai = 0
        n = len(self.studies)
        now = self.t0
        prev = now
        next_tick = self.t0
        while True:
            self.account(prev, now)
            prev = now
            while self.completions and self.completions[0][0] <= now:
                _, seq, key = heapq.heappop(self.completions)
                desk = self.by_key[key]
                if seq == desk.hand_seq:
                    self.finish(desk, now)
            changed = [d for d in self.desks if d.refresh(now)]
            arrived = False
            while ai < n and self.studies[ai].arrival.at <= now:
                st = self.studies[ai]
                self.open[st.arrival.uid] = st
                self.ready[st.arrival.uid] = st
                ai += 1
                arrived = True
                if self.strategy == "round_robin":
                    self.rr_push(st, now)
            self.dispatch(now, changed, arrived)
            if ai >= n and not self.open:
                break
            while bi < len(boundary_times) and boundary_times[bi] <= now:
                bi += 1
            while next_tick <= now:
                next_tick += TICK_S
            candidates = [next_tick]
            if ai < n:
                candidates.append(self.studies[ai].arrival.at)
            if self.completions:
                candidates.append(self.completions[0][0])
            if bi < len(boundary_times):
                candidates.append(boundary_times[bi])
            now = min(candidates)
            if now > self.hard_stop:
                self.account(prev, self.hard_stop)
                now = self.hard_stop
                break
        return self.result(now)

    def account(self, t_from: float, t_to: float) -> None:
        """Busy and available time, counted only inside the arrival window."""
        a, b = max(t_from, self.t0), min(t_to, self.t_last)
        if b <= a:
            return
        dt = b - a
        for d in self.desks:
            busy = d.in_hand is not None
            if busy:
                d.busy_s += dt
            if busy or (d.base.active and d.status.on_shift):
                d.avail_s += dt

    def dispatch(self, now: float, changed: list[_Desk], arrived: bool) -> None:
        if self.strategy == "telerad":
            self.telerad_round(now)
            self.start_own(now, by_urgency=True)
        elif self.strategy == "fifo_pull":
            self.fifo_pull(now)
        else:
            for desk in changed:
                self.rr_redistribute(desk, now)
            if changed or arrived:
                for st in list(self.ready.values()):  # waiting for anyone to come on shift
                    if st.assignee is None:
                        self.rr_push(st, now)
            self.start_own(now, by_urgency=False)

    # -- telerad ----------------------------------------------------------------------------

    def telerad_round(self, now: float) -> None:
        readers = []
        for d in self.desks:
            rvu = [0.0, 0.0, 0.0]
            for st in d.held:
                rvu[st.priority] += st.rvu
            # what the hub knows of an opened case: when it was first opened
            in_progress = in_progress_stat = 0.0
            opened = [*d.paused] if d.in_hand is None else [d.in_hand, *d.paused]
            for case in opened:
                left = remaining_rvu(case.rvu, case.started, now, d.base.rvu_per_hour)
                in_progress += left
                if case.priority == Priority.STAT:
                    in_progress_stat += left
            readers.append(
                replace(
                    d.base,
                    open_rvu=(rvu[0], rvu[1], rvu[2]),
                    open_count=len(d.held) + len(d.paused) + (d.in_hand is not None),
                    in_progress_rvu=in_progress,
                    in_progress_stat_rvu=in_progress_stat,
                    recent_rvu=d.recent_rvu(now),
                )
            )
        studies = [st.qs for st in self.open.values()]
        result = plan(now, studies, readers, self.policy, sticky=self.sticky)
        for dec in result.decisions:
            self.apply(dec, now)

    def apply(self, dec: Decision, now: float) -> None:
        st = self.open.get(dec.study_uid)
        started = st is not None and st.state is StudyState.IN_PROGRESS
        if st is None or (started and dec.kind is not DecisionKind.ESCALATE):
            self.ignored += 1  # the engine may not move a study being read
            return
        if dec.kind is DecisionKind.ESCALATE:
            self.escalations += 1
            st.escalated = True
            st.set(st.state, st.assignee)
            return
        if st.assignee is not None:
            old = self.by_key.get(st.assignee)
            if old is not None and st in old.held:
                old.held.remove(st)
        if dec.kind is DecisionKind.RELEASE:
            self.releases += 1
            st.set(StudyState.READY, None)
            self.ready[st.arrival.uid] = st
            return
        desk = self.by_key.get(dec.radiologist or "")
        if desk is None:
            self.ignored += 1
            st.set(StudyState.READY, None)
            self.ready[st.arrival.uid] = st
            return
        if dec.kind is DecisionKind.REASSIGN:
            self.reassignments += 1
        desk.held.append(st)
        desk.note_held()
        self.ready.pop(st.arrival.uid, None)
        st.set(StudyState.ASSIGNED, desk.key)
        if st.patient_key:
            self.sticky[st.patient_key] = desk.key

    def start_own(self, now: float, *, by_urgency: bool) -> None:
        """Free readers start the next study of their own list that they may start now.

        With ``by_urgency`` (telerad's worklist) a STAT comes first: before a case they set
        aside, and -- when the policy says readers interrupt for STAT -- before the case in
        hand, which they set aside (``RESUME_S`` is what that costs it). Round robin's
        readers work their list in arrival order and never interrupt."""
        interrupts = by_urgency and self.policy.stat_interrupts
        for desk in self.desks:
            hand = desk.in_hand
            if hand is not None and (not interrupts or hand.priority == Priority.STAT):
                continue
            if interrupts and desk.working:
                stats = [
                    st
                    for st in desk.held
                    if st.priority == Priority.STAT and self.may_start(desk, st)
                ]
                if stats:
                    st = min(stats, key=lambda s: urgency_key(s.qs, now, self.policy))
                    if hand is None:
                        self.start(desk, st, now)
                        continue
                    if self.must_interrupt(desk, st):
                        self.interrupt(desk, st, now)
                        continue
            if hand is not None:
                continue
            if desk.paused:
                self.resume(desk, now)  # an opened case is finished, shift or not
                continue
            if not desk.held or not desk.working:
                continue
            allowed = [st for st in desk.held if self.may_start(desk, st)]
            if not allowed:
                continue
            if by_urgency:
                st = min(allowed, key=lambda s: urgency_key(s.qs, now, self.policy))
            else:
                st = min(allowed, key=lambda s: s.idx)
            self.start(desk, st, now)

    # -- fifo pull --------------------------------------------------------------------------

    def fifo_pull(self, now: float) -> None:
        free = [d for d in self.desks if d.in_hand is None and d.working]
        free.sort(key=lambda d: (d.free_since, d.key))
        for desk in free:
            for st in self.ready.values():  # insertion order is arrival order
                if self.may_start(desk, st):
                    self.start(desk, st, now)
                    break

    # -- round robin ------------------------------------------------------------------------

    def rr_push(self, st: _Study, now: float) -> None:
        """To the next reader in rotation who may read it now; else it waits in the pool."""
        n = len(self.desks)
        for k in range(n):
            desk = self.desks[(self.rr_next + k) % n]
            if desk.working and self.may_start(desk, st):
                self.rr_next = (self.rr_next + k + 1) % n
                desk.held.append(st)
                desk.note_held()
                st.set(StudyState.ASSIGNED, desk.key)
                return
        if st.state is not StudyState.READY:
            st.set(StudyState.READY, None)

    def rr_redistribute(self, desk: _Desk, now: float) -> None:
        gone = [st for st in desk.held if not (desk.working and self.may_start(desk, st))]
        for st in sorted(gone, key=lambda s: s.idx):
            desk.held.remove(st)
            self.releases += 1
            st.set(StudyState.READY, None)
            self.rr_push(st, now)

    # -- outcome ----------------------------------------------------------------------------

    def result(self, end: float) -> SimResult:
        classes: dict[str, ClassStats] = {}
        turnarounds: dict[str, list[float]] = {}
        for prio, name in enumerate(PRIORITY_NAMES):
            mine = [st for st in self.studies if st.priority == prio]
            tat = sorted(
                (st.finished - st.arrival.at) / 60.0 if st.finished is not None else math.inf
                for st in mine
            )
            waits = [
                ((st.started if st.started is not None else end) - st.arrival.at) / 60.0
                for st in mine
            ]
            breaches = sum(
                1 for st in mine if st.finished is None or st.finished > st.deadline + 1e-6
            )
            classes[name] = ClassStats(
                count=len(mine),
                read=sum(1 for st in mine if st.finished is not None),
                p50_min=_finite(_percentile(tat, 50)),
                p95_min=_finite(_percentile(tat, 95)),
                breaches=breaches,
                breach_rate=breaches / len(mine) if mine else 0.0,
                longest_wait_min=max(waits) if waits else None,
            )
            turnarounds[name] = [x for x in tat if math.isfinite(x)]
        per_reader = {d.key: d.busy_s / d.avail_s for d in self.desks if d.avail_s > 0}
        busy = sum(d.busy_s for d in self.desks)
        avail = sum(d.avail_s for d in self.desks)
        return SimResult(
            strategy=self.strategy,
            classes=classes,
            utilisation=busy / avail if avail > 0 else 0.0,
            gini=gini(list(per_reader.values())),
            reader_utilisation=per_reader,
            readings=self.readings,
            unread=[st.arrival.uid for st in self.studies if st.finished is None],
            turnarounds=turnarounds,
            escalations=self.escalations,
            reassignments=self.reassignments,
            releases=self.releases,
            interruptions=sum(d.interruptions for d in self.desks),
            ignored_decisions=self.ignored,
            ended_at=end,
            peak_held={d.key: d.peak_held for d in self.desks},
        )


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest rank: an observed value, and infinite when it falls on an unread study."""
    if not sorted_values:
        return math.nan
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)
    return sorted_values[k]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def simulate(
    roster: Roster,
    arrivals: Sequence[Arrival],
    *,
    policy: QueuePolicy,
    strategy: str,
    seed: int,
) -> SimResult:
    """Replay ``arrivals`` against ``roster`` under one strategy (see the module docstring)."""
    return _Sim(roster, arrivals, policy, strategy, seed).run()


# ---------------------------------------------------------------------------- the report

#: (label, what, class, attribute) of the rows compared between strategies; lower is better
_ROWS: tuple[tuple[str, str, str], ...] = (
    ("STAT turnaround p50 (min)", "stat", "p50_min"),
    ("STAT turnaround p95 (min)", "stat", "p95_min"),
    ("URGENT turnaround p50 (min)", "urgent", "p50_min"),
    ("URGENT turnaround p95 (min)", "urgent", "p95_min"),
    ("STAT SLA breaches", "stat", "breach_rate"),
    ("URGENT SLA breaches", "urgent", "breach_rate"),
    ("ROUTINE SLA breaches", "routine", "breach_rate"),
    ("ROUTINE longest wait (min)", "routine", "longest_wait_min"),
)
_CONTEXT_ROWS: tuple[tuple[str, str, str], ...] = (
    ("ROUTINE turnaround p50 (min)", "routine", "p50_min"),
    ("ROUTINE turnaround p95 (min)", "routine", "p95_min"),
)
STAT_P95_TARGET_MIN = 30.0
UTILISATION_TARGET = 0.85


@dataclass
class Report:
    """The three strategies on the same arrivals, with the targets checked."""

    results: dict[str, SimResult]
    policy: QueuePolicy
    seed: int
    arrivals: dict[str, Any] = field(default_factory=dict)
    roster: dict[str, Any] = field(default_factory=dict)

    # -- numbers ----------------------------------------------------------------------------

    def _value(self, strategy: str, cls: str, attr: str) -> float:
        """inf where unread studies make the value unbounded; NaN for an empty class."""
        stats = self.results[strategy].classes[cls]
        if stats.count == 0:
            return math.nan
        v = getattr(stats, attr)
        return math.inf if v is None else float(v)

    def rows(self) -> list[dict[str, Any]]:
        """Compared rows: per strategy value, and whether telerad is <= every other."""
        out: list[dict[str, Any]] = []
        names = list(self.results)
        for label, cls, attr in _ROWS:
            values = {s: self._value(s, cls, attr) for s in names}
            out.append(
                {
                    "metric": label,
                    "values": values,
                    "telerad_best": _best(values),
                }
            )
        gvals = {s: self.results[s].gini for s in names}
        out.append({"metric": "workload Gini", "values": gvals, "telerad_best": _best(gvals)})
        return out

    def targets(self) -> dict[str, bool]:
        t = self.results.get("telerad")
        if t is None:
            return {}
        p95 = t.classes["stat"].p95_min
        return {
            "zero_stat_breaches": t.classes["stat"].breaches == 0,
            "stat_p95_le_30_min": p95 is not None and p95 <= STAT_P95_TARGET_MIN,
            "utilisation_le_85pct": t.utilisation <= UTILISATION_TARGET,
            "telerad_best_on_every_row": all(r["telerad_best"] is not False for r in self.rows()),
        }

    # -- output -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (no NaN/inf: unread makes a percentile ``null``)."""
        rows = [
            {
                "metric": r["metric"],
                "values": {k: _json_num(v) for k, v in r["values"].items()},
                "telerad_best": r["telerad_best"],
            }
            for r in self.rows()
        ]
        return {
            "seed": self.seed,
            "arrivals": self.arrivals,
            "roster": self.roster,
            "policy": {
                "sla_minutes": dict(self.policy.sla_minutes),
                "on_call_priorities": list(self.policy.on_call_priorities),
            },
            "model": {
                "tick_s": TICK_S,
                "noise_sigma": NOISE_SIGMA,
                "hard_stop_after_last_arrival_s": HARD_STOP_S,
            },
            "strategies": {k: v.to_json() for k, v in self.results.items()},
            "rows": rows,
            "targets": self.targets(),
        }

    def table(self) -> str:
        names = list(self.results)
        a = self.arrivals
        lines = []
        if a:
            by_p = a.get("by_priority", {})
            lines.append(
                f"{a.get('count', 0)} studies from {a.get('stations', '?')} stations,"
                f" {a.get('from', '?')} .. {a.get('to', '?')}"
                f" (STAT {by_p.get('stat', 0)}, URGENT {by_p.get('urgent', 0)},"
                f" ROUTINE {by_p.get('routine', 0)}; "
                + ", ".join(f"{m} {n}" for m, n in a.get("by_modality", {}).items())
                + ")"
            )
        if self.roster:
            lines.append(
                f"{self.roster.get('radiologists', '?')} radiologists;"
                f" seed {self.seed}; SLA minutes "
                + "/".join(f"{self.policy.sla_minutes[p]:g}" for p in PRIORITY_NAMES)
                + " (stations may override)"
            )
            if self.roster.get("unroutable"):
                lines.append(
                    f"  {self.roster['unroutable']} studies have no radiologist in the roster"
                    " who may ever read them"
                )
        width = 30
        col = 13
        lines.append("")
        lines.append(
            f"{'metric':<{width}}" + "".join(f"{n:>{col}}" for n in names) + "  telerad<=others"
        )
        lines.append("-" * (width + col * len(names) + 17))
        tgt = self.targets()
        for r in self.rows():
            label = r["metric"]
            cells = "".join(f"{self._cell(label, n, r['values'][n]):>{col}}" for n in names)
            verdict = {True: "yes", False: "NO", None: "n/a"}[r["telerad_best"]]
            lines.append(f"{label:<{width}}{cells}  {verdict}")
        for label, cls, attr in _CONTEXT_ROWS:
            cells = "".join(
                f"{self._cell(label, n, self._value(n, cls, attr)):>{col}}" for n in names
            )
            lines.append(f"{label:<{width}}{cells}  (context)")
        cells = "".join(f"{100 * self.results[n].utilisation:>{col - 1}.1f}%" for n in names)
        lines.append(f"{'utilisation':<{width}}{cells}  (context)")
        cells = "".join(f"{len(self.results[n].unread):>{col}}" for n in names)
        lines.append(f"{'unread at the end':<{width}}{cells}")
        t = self.results.get("telerad")
        if t is not None:
            lines.append(
                f"telerad engine: {t.escalations} escalations, {t.reassignments} reassignments,"
                f" {t.releases} releases; readers set {t.interruptions} cases aside for a STAT"
            )
        if tgt:
            ok = {True: "ok", False: "MISSED"}
            stat = t.classes["stat"] if t else None
            lines += [
                "",
                "targets (telerad):",
                f"  zero STAT breaches: {ok[tgt['zero_stat_breaches']]}"
                + (f" ({stat.breaches} of {stat.count})" if stat else ""),
                f"  STAT p95 <= {STAT_P95_TARGET_MIN:g} min: {ok[tgt['stat_p95_le_30_min']]}",
                f"  utilisation <= {100 * UTILISATION_TARGET:g}%: "
                f"{ok[tgt['utilisation_le_85pct']]}"
                + (f" ({100 * t.utilisation:.1f}%)" if t else ""),
                f"  telerad <= FIFO and round robin on every compared row: "
                f"{ok[tgt['telerad_best_on_every_row']]}",
            ]
        return "\n".join(lines)

    def _cell(self, label: str, strategy: str, value: float) -> str:
        if "breaches" in label:
            cls = label.split()[0].lower()
            st = self.results[strategy].classes[cls]
            return f"{st.breaches} ({100 * st.breach_rate:.1f}%)"
        if math.isinf(value):
            return "unread"
        if math.isnan(value):
            return "-"
        if label == "workload Gini":
            return f"{value:.3f}"
        return f"{value:.1f}"

    def plot(self, png_path: Path | str) -> None:
        """ECDFs of turnaround per class (SLA marked) and per-reader utilisation, as a PNG."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 9), layout="constrained")
        axes = fig.subplots(2, 2)
        colours = {"telerad": "tab:blue", "fifo_pull": "tab:orange", "round_robin": "tab:green"}
        for ax, cls in zip(axes.flat[:3], PRIORITY_NAMES, strict=False):
            sla = self.policy.sla_minutes[cls]
            top = sla * 2.0
            for name, res in self.results.items():
                xs = res.turnarounds[cls]
                total = res.classes[cls].count
                if not total:
                    continue
                ys = [(i + 1) / total for i in range(len(xs))]
                top = max(top, min(max(xs, default=0.0), sla * 4.0))
                ax.step(
                    xs,
                    ys,
                    where="post",
                    label=f"{name} (p95 {_fmt_min(res.classes[cls].p95_min)})",
                    color=colours.get(name),
                )
            ax.axvline(sla, color="red", linestyle="--", linewidth=1, label=f"SLA {sla:g} min")
            if cls == "routine":  # hours of spread: only a log axis shows the body and the tail
                ax.set_xscale("log")
                ax.set_xlim(0.5, max(top, sla * 1.2))
            else:
                ax.set_xlim(0, top)
            ax.set_ylim(0, 1.01)
            ax.set_title(f"{cls.upper()}: turnaround, received to final report")
            ax.set_xlabel("minutes")
            ax.set_ylabel("share of studies reported")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
        ax = axes.flat[3]
        readers = sorted({k for r in self.results.values() for k in r.reader_utilisation})
        width = 0.8 / max(1, len(self.results))
        for j, (name, res) in enumerate(self.results.items()):
            xs = [i + j * width for i in range(len(readers))]
            ys = [100 * res.reader_utilisation.get(k, 0.0) for k in readers]
            ax.bar(
                xs,
                ys,
                width=width,
                color=colours.get(name),
                label=f"{name} (Gini {res.gini:.3f})",
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(readers))])
        ax.set_xticklabels(readers, rotation=45, ha="right", fontsize=8)
        ax.axhline(100 * UTILISATION_TARGET, color="red", linestyle="--", linewidth=1)
        ax.set_ylabel("utilisation % (reading / available)")
        ax.set_title("per-radiologist utilisation over the arrival window")
        ax.legend(fontsize=8)
        path = Path(png_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)


def _fmt_min(x: float | None) -> str:
    return "unread" if x is None else f"{x:.0f} min"


def _best(values: Mapping[str, float]) -> bool | None:
    if "telerad" not in values or len(values) < 2:
        return None
    mine = values["telerad"]
    if math.isnan(mine):
        return None
    return all(mine <= v + 1e-9 for k, v in values.items() if k != "telerad" and not math.isnan(v))


def _json_num(v: float) -> float | None:
    return round(v, 5) if math.isfinite(v) else None


def _describe(arrivals: Sequence[Arrival]) -> dict[str, Any]:
    times = [a.at for a in arrivals]
    counts = {p: 0 for p in PRIORITY_NAMES}
    modalities: dict[str, int] = {}
    for a in arrivals:
        counts[PRIORITY_NAMES[a.priority]] += 1
        modalities[a.modality] = modalities.get(a.modality, 0) + 1
    zone = ZoneInfo(PEAK_TZ)
    return {
        "count": len(arrivals),
        "stations": len({a.station for a in arrivals}),
        "from": datetime.fromtimestamp(min(times), zone).isoformat(timespec="minutes"),
        "to": datetime.fromtimestamp(max(times), zone).isoformat(timespec="minutes"),
        "by_priority": counts,
        "by_modality": dict(sorted(modalities.items())),
    }


def _unroutable(roster: Roster, arrivals: Iterable[Arrival], policy: QueuePolicy) -> int:
    """Studies nobody in the roster may read even on shift: a roster gap, not a queue one."""
    stations = {s.name: s for s in roster.stations}
    readers = [spec.reader() for spec in roster.radiologists]
    on = ShiftStatus(True, False)
    cache: dict[tuple[object, ...], bool] = {}
    count = 0
    for a in arrivals:
        station = stations.get(a.station)
        if station is None:
            continue
        st = _Study(0, a, station, policy, 1.0)
        ok = cache.get(st.profile)
        if ok is None:
            ok = any(eligibility(r, on, st.qs, policy) is None for r in readers)
            cache[st.profile] = ok
        count += not ok
    return count


def compare(
    roster: Roster,
    arrivals: Sequence[Arrival],
    policy: QueuePolicy,
    seed: int,
    *,
    strategies: Sequence[str] = STRATEGIES,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run every strategy on the same arrivals and reading-time draws."""
    results = {}
    for name in strategies:
        if progress is not None:
            progress(name)
        results[name] = simulate(roster, arrivals, policy=policy, strategy=name, seed=seed)
    return Report(
        results=results,
        policy=policy,
        seed=seed,
        arrivals=_describe(arrivals),
        roster={
            "radiologists": len(roster.radiologists),
            "stations": len(roster.stations),
            "unroutable": _unroutable(roster, arrivals, policy),
        },
    )


def dump_json(report: Report, path: Path | str) -> None:
    """Write ``report`` as strict JSON (no NaN)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
