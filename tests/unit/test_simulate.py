"""The reading-day simulator must be fair and exact before its comparison means anything.

Fair: every strategy obeys the same eligibility (checked here against the roster with an
independent re-implementation, not the engine's check) and faces the same reading times.
Exact: every arrival is read once or reported unread, nobody reads two studies at once, a
seed gives the same day twice. And an admin's bad arrivals file gives a clear error.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from reading_queue import QueueError
from reading_queue.simulator import (
    RESUME_S,
    STRATEGIES,
    Arrival,
    ArrivalsError,
    Reading,
    SimResult,
    SimulationError,
    compare,
    load_arrivals,
    simulate,
    synthetic_day,
)
from reading_queue.worklist.policy import QueuePolicy
from reading_queue.worklist.roster import (
    RadiologistSpec,
    Roster,
    load_roster,
    parse_clock,
    parse_days,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_ROSTER = REPO / "deploy" / "roster.example.yaml"
EXAMPLE_ARRIVALS = REPO / "deploy" / "arrivals.example.csv"
TZ = ZoneInfo("Asia/Ho_Chi_Minh")
MONDAY_6AM = datetime(2026, 11, 23, 6, 0, tzinfo=TZ)
POLICY = QueuePolicy()


def _station(name: str, jurisdiction: str, language: str, **extra: object) -> dict[str, object]:
    return {"name": name, "jurisdiction": jurisdiction, "language": language, **extra}


#: small but awkward: a provincial licence, a CR-only reader, an on-call-only neuro reader,
#: Cambodian stations only two people may read, an English station, an exclusion, a
#: preference and a contract SLA; shift changes fall inside the simulated hours.
SMALL = Roster.model_validate(
    {
        "radiologists": [
            {
                "key": "vn.day",
                "modalities": ["CR", "CT"],
                "subspecialties": ["neuro"],
                "licences": ["VN"],
                "languages": ["vi", "en"],
                "shifts": [{"days": "daily", "start": "06:00", "end": "08:30"}],
                "max_concurrent": 3,
                "rvu_per_hour": 10,
            },
            {
                "key": "vn.hn",
                "modalities": ["CR"],
                "licences": ["VN-HN"],
                "languages": ["vi"],
                "shifts": [{"days": "daily", "start": "07:00", "end": "15:00"}],
                "max_concurrent": 2,
                "rvu_per_hour": 8,
            },
            {
                "key": "kh.day",
                "modalities": ["CR", "CT"],
                "licences": ["KH"],
                "languages": ["km"],
                "timezone": "Asia/Phnom_Penh",
                "shifts": [
                    {"days": "mon-fri", "start": "06:30", "end": "08:00"},
                    {"days": "mon-fri", "start": "08:00", "end": "12:00", "on_call": True},
                ],
                "max_concurrent": 2,
                "rvu_per_hour": 7,
            },
            {
                "key": "vn.late",
                "modalities": ["CR", "CT"],
                "licences": ["VN"],
                "languages": ["vi"],
                "shifts": [{"days": "daily", "start": "08:00", "end": "20:00"}],
                "max_concurrent": 4,
                "rvu_per_hour": 9,
            },
            {
                "key": "neuro.oncall",
                "modalities": ["CT"],
                "subspecialties": ["neuro"],
                "licences": ["VN", "KH"],
                "languages": ["vi", "km"],
                "shifts": [{"days": "daily", "start": "00:00", "end": "24:00", "on_call": True}],
                "max_concurrent": 2,
                "rvu_per_hour": 9,
            },
        ],
        "stations": [
            *[_station(f"hn-{i}", "VN-HN", "vi") for i in range(1, 6)],
            _station("hn-intl", "VN-HN", "en"),
            _station("hn-excl", "VN-HN", "vi", excluded=["vn.day"]),
            *[_station(f"sg-{i}", "VN-SG", "vi") for i in range(1, 6)],
            _station("sg-pref", "VN-SG", "vi", preferred=["vn.late"]),
            _station("sg-trauma", "VN-SG", "vi", sla_minutes={"stat": 20, "urgent": 120}),
            *[_station(f"pp-{i}", "KH-12", "km") for i in range(1, 5)],
            _station("sr-1", "KH-17", "km", sla_minutes={"routine": 2880}),
            _station("bare", "", ""),
        ],
    }
)


def small_day(seed: int = 3, hours: float = 4.0) -> list[Arrival]:
    return synthetic_day(
        SMALL, seed=seed, start=MONDAY_6AM, stations=20, hours=hours, studies_per_station=24
    )


@pytest.fixture(scope="module")
def small_results() -> dict[str, SimResult]:
    arrivals = small_day()
    return {s: simulate(SMALL, arrivals, policy=POLICY, strategy=s, seed=3) for s in STRATEGIES}


# ---------------------------------------------------------------------------- the oracle


def _licensed(licences: list[str], jurisdiction: str) -> bool:
    return not jurisdiction or any(
        jurisdiction == lic or jurisdiction.startswith(lic + "-") for lic in licences
    )


def _duty(spec: RadiologistSpec, at: float) -> tuple[bool, bool]:
    """(on a regular shift, on call) at ``at``, straight from the roster's shift specs."""
    zone = ZoneInfo(spec.timezone)
    local = datetime.fromtimestamp(at, zone)
    regular = on_call = False
    for back in (0, 1):
        day = (local - timedelta(days=back)).date()
        for sh in spec.shifts:
            if day.weekday() not in parse_days(sh.days):
                continue
            start = datetime.combine(day, parse_clock(sh.start), zone)
            end = datetime.combine(day, parse_clock(sh.end), zone)
            if end <= start:
                end += timedelta(days=1)
            if start <= local < end:
                if sh.on_call:
                    on_call = True
                else:
                    regular = True
    return regular, on_call


def assert_valid(roster: Roster, arrivals: list[Arrival], result: SimResult) -> None:
    readers = {r.key: r for r in roster.radiologists}
    stations = {s.name: s for s in roster.stations}
    by_uid = {a.uid: a for a in arrivals}
    read = [r.uid for r in result.readings]
    assert len(read) == len(set(read)), "a study was read twice"
    assert set(read).isdisjoint(result.unread)
    assert set(read) | set(result.unread) == set(by_uid)
    assert len(read) + len(result.unread) == len(arrivals)
    for reading in result.readings:
        a = by_uid[reading.uid]
        spec = readers[reading.reader]
        station = stations[a.station]
        subspecialty, _ = POLICY.classify(a.modality, a.body_part)
        who = f"{reading.reader} read {a.modality} {a.body_part} from {a.station}"
        assert a.at <= reading.started < reading.finished, who
        assert a.modality in spec.modalities, who
        assert not subspecialty or subspecialty in spec.subspecialties, who
        assert _licensed(spec.licences, station.jurisdiction), who
        assert not station.language or station.language in spec.languages, who
        assert reading.reader not in station.excluded, who
        regular, on_call = _duty(spec, reading.started)
        on_call_ok = ("stat", "urgent", "routine")[a.priority] in POLICY.on_call_priorities
        assert regular or (on_call and on_call_ok), f"{who} off duty"
    for key in readers:
        # the stretches each study was actually being read: a case set aside for a STAT is
        # not read while it waits
        mine = sorted(
            part
            for r in result.readings
            if r.reader == key
            for part in _worked(r.started, r.finished, r.set_aside)
        )
        for (_, end), (start, _) in pairwise(mine):
            assert start >= end - 1e-6, f"{key} read two studies at once"


def _worked(
    start: float, end: float, aside: tuple[tuple[float, float], ...]
) -> list[tuple[float, float]]:
    out = []
    for a, b in aside:
        assert start <= a < b <= end
        out.append((start, a))
        start = b
    out.append((start, end))
    return out


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_reading_is_eligible_and_every_arrival_accounted(
    strategy: str, small_results: dict[str, SimResult]
) -> None:
    arrivals = small_day()
    assert len(arrivals) > 60
    assert_valid(SMALL, arrivals, small_results[strategy])


def test_example_roster_short_day_is_valid_for_all_strategies() -> None:
    roster = load_roster(EXAMPLE_ROSTER)
    # 05:00-09:00 crosses the night -> day shift change and the on-call hand-over
    start = datetime(2026, 11, 23, 5, 0, tzinfo=TZ)
    arrivals = synthetic_day(roster, seed=5, start=start, hours=4.0, studies_per_station=3)
    assert len(arrivals) > 50
    for strategy in STRATEGIES:
        result = simulate(roster, arrivals, policy=POLICY, strategy=strategy, seed=5)
        assert_valid(roster, arrivals, result)
        assert not result.unread


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=hst.integers(min_value=0, max_value=10_000), hours=hst.floats(0.5, 3.0))
def test_invariants_hold_for_any_seed(seed: int, hours: float) -> None:
    arrivals = synthetic_day(
        SMALL, seed=seed, start=MONDAY_6AM, hours=hours, studies_per_station=15
    )
    if not arrivals:
        return
    for strategy in STRATEGIES:
        result = simulate(SMALL, arrivals, policy=POLICY, strategy=strategy, seed=seed)
        assert_valid(SMALL, arrivals, result)


def test_telerad_never_holds_more_than_max_concurrent(small_results: dict[str, SimResult]) -> None:
    caps = {r.key: r.max_concurrent for r in SMALL.radiologists}
    for key, peak in small_results["telerad"].peak_held.items():
        assert peak <= caps[key], key
    assert all(p <= 1 for p in small_results["fifo_pull"].peak_held.values())


def test_reading_time_draw_is_the_same_in_every_strategy(
    small_results: dict[str, SimResult],
) -> None:
    """duration x reader speed / RVU is the per-study noise: equal whoever read it, wherever."""
    arrivals = {a.uid: a for a in small_day()}
    rates = {r.key: r.rvu_per_hour for r in SMALL.radiologists}
    noise: dict[str, set[float]] = {}
    for result in small_results.values():
        for r in result.readings:
            a = arrivals[r.uid]
            _, rvu = POLICY.classify(a.modality, a.body_part)
            worked = r.finished - r.started - sum(b - a + RESUME_S for a, b in r.set_aside)
            hours = worked / 3600.0
            noise.setdefault(r.uid, set()).add(round(hours * rates[r.reader] / rvu, 6))
    assert noise
    assert all(len(v) == 1 for v in noise.values())


def test_same_seed_same_day_and_result() -> None:
    a1, a2 = small_day(seed=9, hours=2), small_day(seed=9, hours=2)
    assert a1 == a2
    assert small_day(seed=10, hours=2) != a1
    r1 = compare(SMALL, a1, POLICY, 9)
    r2 = compare(SMALL, a2, POLICY, 9)
    assert r1.to_json() == r2.to_json()
    for s in STRATEGIES:
        assert r1.results[s].readings == r2.results[s].readings


def test_read_minutes_fixes_the_reading_time() -> None:
    at = MONDAY_6AM.timestamp() + 3600
    arrivals = [Arrival(at, "sg-1", "CT", "CHEST", 2, read_minutes=7.0, uid="one")]
    for s in STRATEGIES:
        (reading,) = simulate(SMALL, arrivals, policy=POLICY, strategy=s, seed=1).readings
        assert reading.finished - reading.started == pytest.approx(420.0)


def test_telerad_reads_stat_first_fifo_in_arrival_order() -> None:
    roster = Roster.model_validate(
        {
            "radiologists": [
                {
                    "key": "solo",
                    "modalities": ["CR"],
                    "licences": ["VN"],
                    "shifts": [{"days": "daily", "start": "00:00", "end": "24:00"}],
                    "max_concurrent": 2,
                }
            ],
            "stations": [{"name": "s", "jurisdiction": "VN-HN"}],
        }
    )
    t0 = MONDAY_6AM.timestamp()
    arrivals = [
        Arrival(t0 + i, "s", "CR", "CHEST", 2, read_minutes=5, uid=f"r{i}") for i in range(5)
    ]
    arrivals.append(Arrival(t0 + 5, "s", "CR", "CHEST", 0, read_minutes=5, uid="stat"))
    order = {
        s: [r.uid for r in simulate(roster, arrivals, policy=POLICY, strategy=s, seed=1).readings]
        for s in STRATEGIES
    }
    assert order["telerad"].index("stat") == 1  # right after the study in hand
    assert order["fifo_pull"][-1] == "stat"
    assert order["round_robin"][-1] == "stat"


def test_a_stat_interrupts_the_case_in_hand_only_when_waiting_would_risk_it() -> None:
    roster = Roster.model_validate(
        {
            "radiologists": [
                {
                    "key": "solo",
                    "modalities": ["CT"],
                    "licences": ["VN"],
                    "shifts": [{"days": "daily", "start": "00:00", "end": "24:00"}],
                }
            ],
            "stations": [{"name": "s", "jurisdiction": "VN-HN"}],
        }
    )
    t0 = MONDAY_6AM.timestamp()

    def day(routine_minutes: float) -> list[Arrival]:
        return [
            Arrival(t0, "s", "CT", "CHEST", 2, read_minutes=routine_minutes, uid="routine"),
            Arrival(t0 + 60, "s", "CT", "ABDOMEN", 0, read_minutes=10, uid="stat"),
        ]

    def readings(arrivals: list[Arrival], policy: QueuePolicy) -> dict[str, Reading]:
        result = simulate(roster, arrivals, policy=policy, strategy="telerad", seed=1)
        assert_valid(roster, arrivals, result)
        return {r.uid: r for r in result.readings}

    # 20 min of routine CT in hand: the STAT would be done 30 min after t0, inside its
    # escalation window (deadline t0 + 31 min, window 10): set aside at once
    r = readings(day(20), POLICY)
    assert r["stat"].started == pytest.approx(t0 + 60)
    assert r["stat"].finished == pytest.approx(t0 + 660)
    assert r["routine"].set_aside == (pytest.approx((t0 + 60, t0 + 660)),)
    # the routine CT: 19 min left when set aside, finished after the STAT + RESUME_S
    assert r["routine"].finished == pytest.approx(t0 + 660 + 19 * 60 + RESUME_S)
    # the same with interruptions off: the STAT waits for the case in hand
    r = readings(day(20), QueuePolicy(stat_interrupts=False))
    assert r["stat"].started == pytest.approx(t0 + 20 * 60)
    assert r["routine"].set_aside == ()
    # 5 min in hand: waiting leaves the STAT well clear of its window -- no interruption
    r = readings(day(5), POLICY)
    assert r["stat"].started == pytest.approx(t0 + 5 * 60)
    assert r["routine"].set_aside == ()
    # FIFO and round robin never interrupt
    for strategy in ("fifo_pull", "round_robin"):
        result = simulate(roster, day(20), policy=POLICY, strategy=strategy, seed=1)
        assert all(reading.set_aside == () for reading in result.readings)


def test_unreadable_studies_are_unread_and_breached() -> None:
    roster = Roster.model_validate(
        {
            "radiologists": [
                {
                    "key": "vn",
                    "modalities": ["CR"],
                    "licences": ["VN"],
                    "shifts": [{"days": "daily", "start": "00:00", "end": "24:00"}],
                }
            ],
            "stations": [
                {"name": "vn-1", "jurisdiction": "VN-HN"},
                {"name": "la-1", "jurisdiction": "LA-VT"},
            ],
        }
    )
    t0 = MONDAY_6AM.timestamp()
    arrivals = [
        Arrival(t0, "vn-1", "CR", "CHEST", 0, uid="ok"),
        Arrival(t0 + 60, "la-1", "CR", "CHEST", 0, uid="laos"),
    ]
    report = compare(roster, arrivals, POLICY, 1)
    for res in report.results.values():
        assert res.unread == ["laos"]
        stat = res.classes["stat"]
        assert (stat.count, stat.read, stat.breaches) == (2, 1, 1)
        assert stat.p95_min is None  # an unread study has no finite turnaround
    assert report.roster["unroutable"] == 1
    data = report.to_json()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert "unread" in report.table()


# ---------------------------------------------------------------------------- report


def test_report_json_round_trip_table_and_png(tmp_path: Path) -> None:
    arrivals = small_day(seed=4, hours=3)
    report = compare(SMALL, arrivals, POLICY, 4)
    data = report.to_json()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert set(data["strategies"]) == set(STRATEGIES)
    assert data["arrivals"]["count"] == len(arrivals)
    assert set(data["targets"]) == {
        "zero_stat_breaches",
        "stat_p95_le_30_min",
        "utilisation_le_85pct",
        "telerad_best_on_every_row",
    }
    text = report.table()
    for needle in (*STRATEGIES, "STAT turnaround p95", "workload Gini", "targets (telerad)"):
        assert needle in text
    png = tmp_path / "out" / "sim.png"
    report.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_no_patient_identifier_in_output(tmp_path: Path) -> None:
    t0 = MONDAY_6AM.timestamp() + 3600
    arrivals = [
        Arrival(t0 + i * 60, "sg-1", "CR", "CHEST", i % 3, patient="NGUYEN^VAN A 0912", uid=f"u{i}")
        for i in range(6)
    ]
    report = compare(SMALL, arrivals, POLICY, 1)
    assert "NGUYEN" not in report.table() + json.dumps(report.to_json())
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "time,station,modality,body_part,priority,patient\n"
        "2026-11-23T07:00:00+07:00,sg-1,CR,CHEST,asap,NGUYEN^VAN A 0912\n"
    )
    with pytest.raises(ArrivalsError) as err:
        load_arrivals(bad)
    assert "NGUYEN" not in str(err.value)


# ---------------------------------------------------------------------------- arrivals file

HEADER = "time,station,modality,body_part,priority,patient,read_minutes\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "empty file"),
        ("when,station,modality,body_part,priority\n", "missing time"),
        (HEADER.replace("patient", "paitent"), "unknown paitent"),
        (HEADER + "2026-11-23 07:00,sg-1,CR,CHEST,stat,,\n", ":2: time"),
        (HEADER + "2026-11-23T07:00:00,sg-1,CR,CHEST,stat,,\n", "UTC offset"),
        (HEADER + "yesterday,sg-1,CR,CHEST,stat,,\n", "not ISO 8601"),
        (HEADER + "2026-11-23T07:00:00+07:00,sg-1,CR,CHEST,soon,,\n", ":2: priority 'soon'"),
        (HEADER + "2026-11-23T07:00:00+07:00,,CR,CHEST,stat,,\n", "station is empty"),
        (HEADER + "2026-11-23T07:00:00+07:00,sg-1,C R,CHEST,stat,,\n", "modality"),
        (HEADER + "2026-11-23T07:00:00+07:00,sg-1,CR,CHEST,stat\n", "5 fields"),
        (HEADER + "2026-11-23T07:00:00+07:00,sg-1,CR,CHEST,stat,,-3\n", "read_minutes"),
        (HEADER + "2026-11-23T07:00:00+07:00,sg-1,CR,CHEST,stat,,ten\n", "read_minutes"),
        (HEADER + "\n2026-11-23T07:00:00+07:00,nowhere,CR,CHEST,stat,,\n", ":3: station 'nowhere'"),
        (HEADER, "no arrivals"),
    ],
)
def test_bad_arrivals_file_gives_a_clear_error(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "arrivals.csv"
    path.write_text(content)
    with pytest.raises(ArrivalsError) as err:
        load_arrivals(path, SMALL)
    message = str(err.value)
    assert str(path) in message
    assert expected in message
    assert isinstance(err.value, QueueError)


def test_unreadable_arrivals_files(tmp_path: Path) -> None:
    with pytest.raises(ArrivalsError, match="cannot read"):
        load_arrivals(tmp_path / "missing.csv")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00time\x00")
    with pytest.raises(ArrivalsError, match="UTF-8"):
        load_arrivals(binary)


def test_arrivals_file_parses_and_sorts(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        "Time,Station,Modality,Body_Part,Priority\n"
        "2026-11-23T08:00:00+07:00,sg-1,cr,chest,URGENT\n"
        "# a comment line\n"
        "2026-11-23T00:30:00Z,pp-1,CT,head,stat\n"
    )
    first, second = load_arrivals(path)
    assert (first.station, first.modality, first.body_part, first.priority) == (
        "pp-1",
        "CT",
        "HEAD",
        0,
    )
    assert first.at == datetime(2026, 11, 23, 0, 30, tzinfo=ZoneInfo("UTC")).timestamp()
    assert second.priority == 1 and second.read_minutes is None
    assert first.uid != second.uid


def test_unknown_station_is_an_error_not_a_crash() -> None:
    arrivals = [Arrival(MONDAY_6AM.timestamp(), "atlantis", "CR", "CHEST", 2, uid="x")]
    with pytest.raises(SimulationError, match="atlantis"):
        simulate(SMALL, arrivals, policy=POLICY, strategy="telerad", seed=1)
    with pytest.raises(SimulationError, match="strategy"):
        simulate(SMALL, small_day(hours=1), policy=POLICY, strategy="lottery", seed=1)


# ---------------------------------------------------------------------------- example files


def test_example_files_load_and_run() -> None:
    roster = load_roster(EXAMPLE_ROSTER)
    assert len(roster.radiologists) == 12
    assert len(roster.stations) == 150
    arrivals = load_arrivals(EXAMPLE_ARRIVALS, roster)
    assert 40 <= len(arrivals) <= 60
    assert any(a.read_minutes for a in arrivals)
    report = compare(roster, arrivals, POLICY, 1)
    assert all(not r.unread for r in report.results.values())
    assert report.roster["unroutable"] == 0


def test_synthetic_day_has_the_issue_mix_and_a_morning_peak() -> None:
    roster = load_roster(EXAMPLE_ROSTER)
    start = datetime(2026, 11, 23, tzinfo=TZ)
    arrivals = synthetic_day(roster, seed=2, start=start)
    n = len(arrivals)
    assert 1100 < n < 1600  # 150 stations x 9 a day
    assert all(start.timestamp() <= a.at < start.timestamp() + 86400 for a in arrivals)
    share = lambda pred: sum(1 for a in arrivals if pred(a)) / n  # noqa: E731
    assert 0.66 < share(lambda a: a.modality == "CR") < 0.74
    assert 0.07 < share(lambda a: a.priority == 0) < 0.13
    assert 0.12 < share(lambda a: a.priority == 1) < 0.18
    hours = [datetime.fromtimestamp(a.at, TZ).hour for a in arrivals]
    morning = sum(1 for h in hours if 7 <= h < 11) / 4
    night = sum(1 for h in hours if 0 <= h < 5) / 5
    assert morning > 3 * night
    heads = [a for a in arrivals if a.modality == "CT" and a.body_part == "HEAD"]
    assert 0.3 < len(heads) / share(lambda a: a.modality == "CT") / n < 0.5
    patients = [a.patient for a in arrivals]
    assert len(set(patients)) < len(patients)  # follow-ups
    assert len({a.station for a in arrivals}) > 140
    with pytest.raises(ValueError):
        synthetic_day(roster, seed=1, start=datetime(2026, 11, 23))
