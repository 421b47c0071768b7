"""The assignment engine, by example: eligibility, choice, leases, escalation and shifts.

Every scenario is plain data in, decisions out (the engine reads no clock), so each test builds
readers and studies around one fixed ``NOW`` and checks the decisions and their reasons.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from reading_queue.worklist.engine import (
    Decision,
    DecisionKind,
    Plan,
    QueuedStudy,
    Reader,
    Shift,
    StudyState,
    gini,
    ineligibility,
    licence_covers,
    next_for,
    on_shift_seconds,
    order_deadline,
    plan,
    remaining_rvu,
    shift_status,
    urgency_key,
)
from reading_queue.worklist.policy import ProcedureRule, QueuePolicy
from telerad.core.priority import Priority

STAT, URGENT, ROUTINE = Priority.STAT, Priority.URGENT, Priority.ROUTINE
POLICY = QueuePolicy()
#: Wednesday 2024-05-15 10:00 UTC
NOW = datetime(2024, 5, 15, 10, 0, tzinfo=UTC).timestamp()
MIN = 60.0
#: on shift around the clock, every day
ALWAYS = tuple(Shift(d, time(0), time(0)) for d in range(7))


def reader(key: str, **kw: object) -> Reader:
    fields: dict[str, object] = {
        "modalities": frozenset({"CT", "MR", "CR"}),
        "licences": frozenset({"VN"}),
        "shifts": ALWAYS,
    }
    fields.update(kw)
    return Reader(key=key, **fields)  # type: ignore[arg-type]


def study(uid: str, **kw: object) -> QueuedStudy:
    """A ready ROUTINE CT of 1 RVU due in 10 h unless told otherwise."""
    fields: dict[str, object] = {
        "priority": ROUTINE,
        "modality": "CT",
        "received_at": NOW - 10 * MIN,
        "deadline": NOW + 600 * MIN,
        "rvu": 1.0,
        "jurisdiction": "VN",
    }
    fields.update(kw)
    return QueuedStudy(uid=uid, **fields)  # type: ignore[arg-type]


def held(
    uid: str, assignee: str, *, state: StudyState = StudyState.ASSIGNED, **kw: object
) -> QueuedStudy:
    """A study ``assignee`` holds, with a lease still running unless told otherwise."""
    kw.setdefault("lease_expires_at", NOW + 10 * MIN)
    return study(uid, state=state, assignee=assignee, **kw)


def with_load(r: Reader, studies: list[QueuedStudy], now: float = NOW) -> Reader:
    """``r`` carrying the load of the studies it holds among ``studies``, as the worklist
    computes it: RVU per priority of those not opened, RVU left on those opened."""
    mine = [
        s
        for s in studies
        if s.assignee == r.key and s.state in (StudyState.ASSIGNED, StudyState.IN_PROGRESS)
    ]
    rvu = [0.0, 0.0, 0.0]
    in_progress = in_progress_stat = 0.0
    for s in mine:
        if s.state is StudyState.IN_PROGRESS:
            left = remaining_rvu(s.rvu, s.started_at, now, r.rvu_per_hour)
            in_progress += left
            if s.priority == STAT:
                in_progress_stat += left
        else:
            rvu[s.priority] += s.rvu
    return Reader(
        key=r.key,
        modalities=r.modalities,
        licences=r.licences,
        languages=r.languages,
        subspecialties=r.subspecialties,
        timezone=r.timezone,
        shifts=r.shifts,
        max_concurrent=r.max_concurrent,
        rvu_per_hour=r.rvu_per_hour,
        active=r.active,
        open_rvu=(rvu[0], rvu[1], rvu[2]),
        open_count=len(mine),
        in_progress_rvu=in_progress,
        in_progress_stat_rvu=in_progress_stat,
        recent_rvu=r.recent_rvu,
    )


def run(studies: list[QueuedStudy], readers: list[Reader], **kw: object) -> Plan:
    loaded = [with_load(r, studies) for r in readers]
    return plan(NOW, studies, loaded, kw.pop("policy", POLICY), **kw)  # type: ignore[arg-type]


def kinds(p: Plan) -> list[tuple[str, str, str | None]]:
    return [(d.kind.value, d.study_uid, d.radiologist) for d in p.decisions]


def assigned(p: Plan) -> dict[str, str | None]:
    return {
        d.study_uid: d.radiologist
        for d in p.decisions
        if d.kind in (DecisionKind.ASSIGN, DecisionKind.REASSIGN)
    }


def only(p: Plan, kind: DecisionKind) -> Decision:
    found = p.of_kind(kind)
    assert len(found) == 1, p.decisions
    return found[0]


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def local(text: str, tz: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


# -- reasons ------------------------------------------------------------------------------


def test_assignment_reasons_name_licence_modality_language_choice_and_slack() -> None:
    s = study(
        "s1",
        priority=STAT,
        jurisdiction="VN-HN",
        language="vi",
        subspecialty="neuro",
        deadline=NOW + 12 * MIN,
        rvu=0.85,
    )
    r = reader("dr.an", languages=frozenset({"vi", "en"}), subspecialties=frozenset({"neuro"}))
    d = only(run([s], [r]), DecisionKind.ASSIGN)
    assert (d.study_uid, d.radiologist) == ("s1", "dr.an")
    eligible, chosen, slack = d.reasons
    assert eligible.startswith("eligible: dr.an ")
    assert "licensed VN" in eligible
    assert "reads CT-neuro" in eligible
    assert "reports in vi" in eligible
    assert "on shift" in eligible
    assert chosen.startswith("chosen: earliest finish")
    assert "1 eligible with room" in chosen
    assert slack == "slack 12 min"
    assert d.lease_expires_at == NOW + POLICY.lease_s(STAT)


def test_reason_names_the_provincial_licence_that_covers_the_study() -> None:
    s = study("s1", jurisdiction="KH-12")
    r = reader("r1", licences=frozenset({"VN", "KH-12"}))
    eligible = only(run([s], [r]), DecisionKind.ASSIGN).reasons[0]
    assert "licensed KH-12" in eligible
    assert "licensed VN" not in eligible


def test_reason_says_on_call_for_an_on_call_reader_and_slack_in_hours_when_long() -> None:
    on_call = tuple(Shift(d, time(0), time(0), on_call=True) for d in range(7))
    s = study("s1", priority=URGENT, deadline=NOW + 180 * MIN)
    d = only(run([s], [reader("r1", shifts=on_call)]), DecisionKind.ASSIGN)
    assert d.reasons[0].endswith("on call")
    assert d.reasons[-1] == "slack 3.0 h"
    assert d.lease_expires_at == NOW + POLICY.lease_s(URGENT)


def test_stat_lease_is_shorter_than_routine_lease() -> None:
    p = run([study("stat", priority=STAT), study("routine")], [reader("r1")])
    lease = {d.study_uid: d.lease_expires_at for d in p.of_kind(DecisionKind.ASSIGN)}
    assert lease["stat"] is not None and lease["routine"] is not None
    assert NOW < lease["stat"] < lease["routine"]


def test_explain_lists_why_a_study_waits() -> None:
    s = study("s1", modality="MR")
    readers = [
        reader("ct-only", modalities=frozenset({"CT"})),
        reader("off", shifts=()),
        reader("gone", active=False),
    ]
    p = run([s], readers, explain=True)
    assert p.decisions == []
    assert p.waiting == {"s1": "waiting: 1 does not read MR; 1 inactive; 1 off shift"}
    assert run([s], [], explain=True).waiting == {"s1": "no radiologists"}


# -- eligibility ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "study_kw"),
    [
        ({"modalities": frozenset({"MR"})}, {}),
        ({"licences": frozenset({"KH"})}, {"jurisdiction": "VN-HN"}),
        ({"licences": frozenset({"VN-SG"})}, {"jurisdiction": "VN-HN"}),
        ({"languages": frozenset({"km"})}, {"language": "vi"}),
        ({"subspecialties": frozenset()}, {"subspecialty": "neuro"}),
        ({"shifts": ()}, {}),
        ({"active": False}, {}),
        ({"max_concurrent": 0}, {}),
    ],
    ids=[
        "modality",
        "licence",
        "other-province",
        "language",
        "subspecialty",
        "off-shift",
        "inactive",
        "no-capacity",
    ],
)
def test_the_only_ineligible_reader_gets_nothing(
    change: dict[str, object], study_kw: dict[str, object]
) -> None:
    s = study("s1", priority=STAT, **study_kw)
    base = {"languages": frozenset({"vi"}), "subspecialties": frozenset({"neuro"})}
    assert assigned(run([s], [reader("ok", **base)])) == {"s1": "ok"}
    assert assigned(run([s], [reader("no", **{**base, **change})])) == {}


def test_reader_without_languages_and_study_without_language_match_anyone() -> None:
    assert assigned(run([study("s1", language="km")], [reader("r1")])) == {"s1": "r1"}
    r = reader("r1", languages=frozenset({"vi"}))
    assert assigned(run([study("s1")], [r])) == {"s1": "r1"}


def test_national_licence_covers_its_provinces() -> None:
    s = study("s1", jurisdiction="VN-HN")
    assert assigned(run([s], [reader("national", licences=frozenset({"VN"}))])) == {
        "s1": "national"
    }
    s2 = study("s2", jurisdiction="VN")
    assert assigned(run([s2], [reader("prov", licences=frozenset({"VN-HN"}))])) == {}


def test_on_call_reader_takes_stat_and_urgent_but_not_routine() -> None:
    on_call = tuple(Shift(d, time(0), time(0), on_call=True) for d in range(7))
    r = reader("r1", shifts=on_call)
    studies = [study("stat", priority=STAT), study("urgent", priority=URGENT), study("routine")]
    p = run(studies, [r], explain=True)
    assert assigned(p) == {"stat": "r1", "urgent": "r1"}
    assert p.waiting["routine"] == "waiting: 1 on call only (stat, urgent)"
    only_stat = QueuePolicy(on_call_priorities=["stat"])
    assert assigned(run(studies, [r], policy=only_stat)) == {"stat": "r1"}


ON_CALL = tuple(Shift(d, time(0), time(0), on_call=True) for d in range(7))


def test_stat_goes_to_a_free_reader_on_shift_before_waking_the_on_call_one() -> None:
    # the on-call reader is faster, but somebody on shift is free: they take it
    slow = reader("on-shift", rvu_per_hour=6.0)
    fast = reader("on-call", shifts=ON_CALL, rvu_per_hour=12.0)
    s = study("s", priority=STAT, deadline=NOW + 30 * MIN)
    d = only(run([s], [slow, fast]), DecisionKind.ASSIGN)
    assert d.radiologist == "on-shift"
    assert not any("on call" in r for r in d.reasons)
    # nobody on shift is free: the on-call reader is woken at once (a STAT does not wait)
    busy = [s, held("h", "on-shift", state=StudyState.IN_PROGRESS, started_at=NOW, rvu=1.0)]
    d = only(run(busy, [slow, fast]), DecisionKind.ASSIGN)
    assert d.radiologist == "on-call"
    assert "on call: nobody on shift would be as quick" in d.reasons[1]
    # without the rule (0 minutes) the fastest free reader wins, on call or not
    no_rule = QueuePolicy(on_call_penalty_minutes=0)
    assert assigned(run([s], [slow, fast], policy=no_rule)) == {"s": "on-call"}
    # the reader on shift would miss a trauma contract's 20 min (2.5 RVU at 6/h = 25 min):
    # the on-call reader, who would not, is woken
    trauma = study("t", priority=STAT, rvu=2.5, deadline=NOW + 20 * MIN)
    assert assigned(run([trauma], [slow, fast])) == {"t": "on-call"}


def test_urgent_waits_a_little_for_a_reader_on_shift_rather_than_calling_on_call() -> None:
    # the reader on shift has 10 min of work ahead: calling the on-call reader would save
    # ~10 min, less than the 30 min it must save
    on_shift = reader("on-shift", rvu_per_hour=6.0)
    on_call = reader("on-call", shifts=ON_CALL, rvu_per_hour=6.0)
    u = study("u", priority=URGENT, rvu=0.5, deadline=NOW + 240 * MIN)
    work = held("h", "on-shift", state=StudyState.IN_PROGRESS, started_at=NOW, rvu=1.0)
    assert assigned(run([u, work], [on_shift, on_call])) == {"u": "on-shift"}
    # 40 min of work ahead on shift: the on-call reader saves 40 min and is called
    long = held("h", "on-shift", state=StudyState.IN_PROGRESS, started_at=NOW, rvu=4.0)
    d = only(run([u, long], [on_shift, on_call]), DecisionKind.ASSIGN)
    assert d.radiologist == "on-call" and "on call" in d.reasons[1]
    # the threshold is the policy's
    patient = QueuePolicy(on_call_penalty_minutes=50)
    assert assigned(run([u, long], [on_shift, on_call], policy=patient)) == {"u": "on-shift"}


def test_several_free_readers_the_one_on_shift_takes_urgent_work() -> None:
    # both free, the on-call one has worked less lately: still the one on shift
    on_shift = reader("on-shift", recent_rvu=20.0)
    on_call = reader("on-call", shifts=ON_CALL)
    u = study("u", priority=URGENT)
    assert assigned(run([u], [on_shift, on_call])) == {"u": "on-shift"}
    # two free on shift: the least busy lately, as before
    other = reader("other-shift")
    assert assigned(run([u], [on_shift, on_call, other])) == {"u": "other-shift"}


# -- choice -------------------------------------------------------------------------------


def test_least_projected_rvu_load_wins_not_the_fewest_studies() -> None:
    # a holds three chest CRs (0.66 RVU), b holds one trauma CT (2.5 RVU)
    held_studies = [
        held("cr1", "a", modality="CR", rvu=0.22),
        held("cr2", "a", modality="CR", rvu=0.22),
        held("cr3", "a", modality="CR", rvu=0.22),
        held("ct1", "b", rvu=2.5),
    ]
    p = run([*held_studies, study("new")], [reader("a"), reader("b")])
    d = only(p, DecisionKind.ASSIGN)
    assert d.radiologist == "a"
    # (0.66 + 1.0) RVU at 8 RVU/h: 12 min
    want = "chosen: least projected load (12 min of work incl. this study, 2 eligible"
    assert d.reasons[1].startswith(want)


def test_work_of_lower_priority_does_not_delay_a_stat() -> None:
    # a has 10 RVU of routine work, b 1 RVU of STAT: a reads a new STAT first
    studies = [held("r", "a", rvu=10.0), held("s", "b", priority=STAT, rvu=1.0)]
    p = run([*studies, study("new", priority=STAT)], [reader("a"), reader("b")])
    assert assigned(p) == {"new": "a"}


def test_faster_reader_wins_at_equal_load() -> None:
    studies = [held("x", "slow", rvu=2.0), held("y", "fast", rvu=2.0)]
    readers = [reader("slow", rvu_per_hour=4.0), reader("fast", rvu_per_hour=16.0)]
    assert assigned(run([*studies, study("new")], readers)) == {"new": "fast"}


def test_fairness_term_favours_the_reader_with_less_recent_work() -> None:
    readers = [reader("busy", recent_rvu=8.0), reader("rested")]
    assert assigned(run([study("new")], readers)) == {"new": "rested"}
    # with no fairness weight the tie goes to the first key
    policy = QueuePolicy(fairness_weight=0.0)
    assert assigned(run([study("new")], readers, policy=policy)) == {"new": "busy"}


def test_ties_break_by_reader_key() -> None:
    assert assigned(run([study("new")], [reader("b"), reader("a")])) == {"new": "a"}


def test_preferred_reader_wins_within_the_bonus() -> None:
    studies = [held("x", "pref", rvu=1.0)]  # 7.5 min more work than "other"
    s = study("new", preferred=frozenset({"pref"}))
    d = only(run([*studies, s], [reader("other"), reader("pref")]), DecisionKind.ASSIGN)
    assert d.radiologist == "pref"
    assert d.reasons[1].endswith("; preferred by the station")


def test_preferred_reader_loses_beyond_the_bonus() -> None:
    studies = [held("x", "pref", rvu=4.0)]  # 30 min more work, bonus is 10 min
    s = study("new", preferred=frozenset({"pref"}))
    d = only(run([*studies, s], [reader("other"), reader("pref")]), DecisionKind.ASSIGN)
    assert d.radiologist == "other"
    assert "preferred" not in d.reasons[1]


def test_excluded_reader_never_gets_the_station_study() -> None:
    s = study("new", excluded=frozenset({"a"}))
    assert assigned(run([s], [reader("a"), reader("b", recent_rvu=50.0)])) == {"new": "b"}
    p = run([s], [reader("a")], explain=True)
    assert assigned(p) == {}
    assert p.waiting == {"new": "waiting: 1 excluded by the station"}


# -- stickiness -----------------------------------------------------------------------------


def test_patients_new_study_goes_to_the_reader_of_their_other_study() -> None:
    studies = [held("x", "b", rvu=2.0), study("new", patient_key="p1")]
    readers = [reader("a"), reader("b")]
    assert assigned(run(studies, readers)) == {"new": "a"}  # least load without stickiness
    d = only(run(studies, readers, sticky={"p1": "b"}), DecisionKind.ASSIGN)
    assert d.radiologist == "b"
    assert d.reasons[1] == "chosen: reads this patient's other study (sticky)"


def test_stickiness_yields_when_the_sticky_reader_would_miss_the_deadline() -> None:
    # b has 10 RVU ahead (75 min); the study is due in 30 min
    studies = [held("x", "b", rvu=10.0), study("new", patient_key="p1", deadline=NOW + 30 * MIN)]
    d = only(run(studies, [reader("a"), reader("b")], sticky={"p1": "b"}), DecisionKind.ASSIGN)
    assert d.radiologist == "a"
    assert "sticky" not in d.reasons[1]


@pytest.mark.parametrize(
    ("sticky_reader", "study_kw"),
    [
        (reader("b", modalities=frozenset({"CR"})), {}),
        (reader("b"), {"excluded": frozenset({"b"})}),
        (reader("b", shifts=()), {}),
        (reader("b", max_concurrent=0), {}),
    ],
    ids=["modality", "excluded", "off-shift", "no-room"],
)
def test_stickiness_yields_when_the_sticky_reader_may_not_take_it(
    sticky_reader: Reader, study_kw: dict[str, object]
) -> None:
    s = study("new", patient_key="p1", **study_kw)
    p = run([s], [reader("a", recent_rvu=40.0), sticky_reader], sticky={"p1": "b"})
    assert assigned(p) == {"new": "a"}


def test_stickiness_needs_the_patient_key() -> None:
    p = run([study("new")], [reader("a"), reader("b", recent_rvu=1.0)], sticky={"": "b"})
    assert assigned(p) == {"new": "a"}


# -- work in hand, shift ends, pull-only rounds -------------------------------------------


def test_remaining_rvu_of_an_opened_study() -> None:
    assert remaining_rvu(5.0, None, NOW, 8.0) == 5.0  # not opened: all of it
    assert remaining_rvu(5.0, NOW - 15 * MIN, NOW, 8.0) == pytest.approx(3.0)
    assert remaining_rvu(5.0, NOW - 90 * MIN, NOW, 8.0) == pytest.approx(1.5)  # overrun: 30 %
    assert remaining_rvu(5.0, NOW + 5 * MIN, NOW, 8.0) == 5.0  # opened "later": nothing done


def test_the_case_in_hand_comes_before_a_new_stat() -> None:
    # a is 4 RVU into an opened routine study; b has 1 RVU of routine work not yet opened
    studies = [
        held("opened", "a", state=StudyState.IN_PROGRESS, rvu=4.0),
        held("queued", "b", rvu=1.0),
        study("stat", priority=STAT),
    ]
    assert assigned(run(studies, [reader("a"), reader("b")])) == {"stat": "b"}


def test_opened_study_counts_only_what_is_left() -> None:
    # a opened a 4 RVU study 20 min ago (2.67 RVU done, 1.33 left); b has 2 RVU not yet opened
    studies = [
        held("opened", "a", state=StudyState.IN_PROGRESS, rvu=4.0, started_at=NOW - 20 * MIN),
        held("queued", "b", rvu=2.0),
        study("new"),
    ]
    assert assigned(run(studies, [reader("a"), reader("b")])) == {"new": "a"}


def test_stat_goes_to_the_earliest_finish_whatever_fairness_or_preference() -> None:
    readers = [reader("a", recent_rvu=96.0), reader("b")]
    routine = study("routine", preferred=frozenset({"b"}))
    stat = study("stat", priority=STAT, preferred=frozenset({"b"}))
    assert assigned(run([routine], readers)) == {"routine": "b"}
    # equal load: a STAT ignores a's recent work and b's preference, the key breaks the tie
    d = only(run([stat], readers), DecisionKind.ASSIGN)
    assert d.radiologist == "a"
    assert "preferred" not in d.reasons[1]


def test_no_push_to_a_reader_who_leaves_before_starting_it() -> None:
    # a's shift ends at 10:10 and they have 15 min of work ahead; b has 5 min
    a = reader("a", shifts=(Shift(2, time(2), time(10, 10)),))
    studies = [held("x", "a", priority=STAT, rvu=2.0), held("y", "b", priority=STAT, rvu=0.6)]
    stat = study("stat", priority=STAT)
    assert assigned(run([*studies, stat], [a, reader("b", max_concurrent=1)])) == {}
    # an idle reader is still given work up to the end of the shift
    assert assigned(run([stat], [a])) == {"stat": "a"}


def test_back_to_back_shifts_do_not_end_at_midnight() -> None:
    now = utc("2024-05-15T23:50")
    studies = [held("x", "a", priority=STAT, rvu=2.0, lease_expires_at=now + 5 * MIN)]
    stat = study("stat", priority=STAT, received_at=now, deadline=now + 30 * MIN)
    readers = [with_load(reader("a"), studies, now)]  # ALWAYS: every day 00:00-24:00
    p = plan(now, [*studies, stat], readers, POLICY)
    assert assigned(p) == {"stat": "a"}


def test_day_shift_running_into_on_call_still_takes_a_stat() -> None:
    now = utc("2024-05-15T17:50")
    shifts = tuple(Shift(d, time(8), time(18)) for d in range(7)) + tuple(
        Shift(d, time(18), time(8), on_call=True) for d in range(7)
    )
    studies = [held("x", "a", priority=STAT, rvu=2.0, lease_expires_at=now + 5 * MIN)]
    stat = study("stat", priority=STAT, received_at=now, deadline=now + 30 * MIN)
    readers = [with_load(reader("a", shifts=shifts), studies, now)]  # 15 min of STAT work
    assert assigned(plan(now, [*studies, stat], readers, POLICY)) == {"stat": "a"}


def test_waiting_reason_names_the_shift_end() -> None:
    a = reader("a", shifts=(Shift(2, time(2), time(10, 10)),))
    studies = [held("x", "a", priority=STAT, rvu=2.0)]
    p = run([*studies, study("stat", priority=STAT)], [a], explain=True)
    assert "capacity" not in p.waiting["stat"]
    assert "shift" in p.waiting["stat"]


def test_releasing_a_partly_read_study_keeps_the_readers_other_work() -> None:
    studies = [
        # a read most of A (10 RVU, opened 70 min ago) then let the lease lapse; B is fresh
        held(
            "A",
            "a",
            state=StudyState.IN_PROGRESS,
            rvu=10.0,
            started_at=NOW - 70 * MIN,
            lease_expires_at=NOW - MIN,
        ),
        held("B", "a", state=StudyState.IN_PROGRESS, rvu=8.0, started_at=NOW),  # 60 min left
        held("C", "c", priority=STAT, rvu=2.0),  # c: 15 min of STAT work
        study("stat", priority=STAT),
    ]
    p = run(studies, [reader("a"), reader("c")])
    assert kinds(p)[0] == ("release", "A", "a")
    assert assigned(p)["stat"] == "c"


def test_pull_only_round_releases_and_escalates_but_assigns_nothing() -> None:
    studies = [
        held("lapsed", "a", lease_expires_at=NOW - MIN),
        held("risk", "a", deadline=NOW + 30 * MIN, priority=URGENT),
        study("new", priority=STAT, deadline=NOW + 5 * MIN),
    ]
    p = run(studies, [reader("a"), reader("b")], assign=False)
    assert sorted(kinds(p)) == [
        ("escalate", "new", None),
        ("escalate", "risk", "a"),
        ("release", "lapsed", "a"),
    ]


def test_ineligibility_says_why() -> None:
    r = reader("r", languages=frozenset({"km"}), shifts=(Shift(2, time(12), time(20)),))
    assert ineligibility(r, study("s"), NOW, POLICY) == "off shift"
    assert ineligibility(r, study("s", modality="US"), NOW, POLICY) == "does not read US"
    assert ineligibility(r, study("s", language="vi"), NOW, POLICY) == "does not report in vi"
    assert ineligibility(r, study("s", jurisdiction="KH"), NOW, POLICY) == "not licensed for KH"
    assert ineligibility(r, study("s", subspecialty="msk"), NOW, POLICY) == "no msk subspecialty"
    assert ineligibility(r, study("s"), NOW + 3 * 3600, POLICY) is None


def test_overdue_study_says_so() -> None:
    s = study("late", priority=URGENT, deadline=NOW - 7 * MIN, escalated=True)
    assert only(run([s], [reader("a")]), DecisionKind.ASSIGN).reasons[-1] == "overdue 7 min"


def test_order_deadline_is_capped_by_the_hub_sla() -> None:
    # a 48 h routine contract is ordered as if due 24 h after receipt (the hub's own SLA)
    generous = study("generous", received_at=NOW, deadline=NOW + 48 * 3600)
    assert order_deadline(generous, POLICY) == NOW + 24 * 3600
    strict_contract = study("strict", received_at=NOW, deadline=NOW + 3600)
    assert order_deadline(strict_contract, POLICY) == NOW + 3600
    assert urgency_key(generous, NOW, POLICY)[1] == 24 * 3600


# -- ordering and ageing --------------------------------------------------------------------


def test_ready_studies_go_by_class_then_slack() -> None:
    studies = [
        study("routine-soon", deadline=NOW + 300 * MIN),
        study("urgent-late", priority=URGENT, deadline=NOW + 200 * MIN),
        study("stat-late", priority=STAT, deadline=NOW + 29 * MIN),
        study("stat-soon", priority=STAT, deadline=NOW + 5 * MIN),
    ]
    order = sorted(studies, key=lambda s: urgency_key(s, NOW, POLICY))
    assert [s.uid for s in order] == ["stat-soon", "stat-late", "urgent-late", "routine-soon"]


def test_routine_within_the_stat_sla_is_ordered_with_stat() -> None:
    routine = study("routine", deadline=NOW + 20 * MIN)
    stat = study("stat", priority=STAT, deadline=NOW + 25 * MIN)
    assert urgency_key(routine, NOW, POLICY)[0] == STAT
    assert urgency_key(routine, NOW, POLICY) < urgency_key(stat, NOW, POLICY)
    # one slot: the aged routine study is read first
    p = run([stat, routine], [reader("r1", max_concurrent=1)])
    assert assigned(p) == {"routine": "r1"}


def test_routine_ages_into_urgent_then_stat() -> None:
    s = study("s", received_at=NOW, deadline=NOW + 1440 * MIN)
    classes = [urgency_key(s, s.deadline - m * MIN, POLICY)[0] for m in (1440, 241, 240, 31, 30, 0)]
    assert classes == [ROUTINE, ROUTINE, URGENT, URGENT, STAT, STAT]
    late = study("late", deadline=NOW - 5 * MIN)
    assert urgency_key(late, NOW, POLICY)[:2] == (STAT, -300.0)


def test_urgency_key_ends_with_arrival_then_uid() -> None:
    a = study("b", received_at=NOW - 5 * MIN)
    b = study("a", received_at=NOW - 1 * MIN)
    c = study("c", received_at=NOW - 1 * MIN)
    keys = sorted([c, b, a], key=lambda s: urgency_key(s, NOW, POLICY))
    assert [s.uid for s in keys] == ["b", "a", "c"]


def test_stat_ignores_the_backlog_limit_but_routine_does_not() -> None:
    studies = [held("x", "r1", rvu=10.0), study("stat", priority=STAT), study("routine")]
    p = run(studies, [reader("r1")], explain=True)
    assert assigned(p) == {"stat": "r1"}
    assert p.waiting == {"routine": "waiting: 1 more than 60 min of work ahead"}


def test_no_more_assignments_than_capacity() -> None:
    studies = [study(f"s{i}", priority=STAT, rvu=0.1) for i in range(5)]
    p = run(studies, [reader("r1", max_concurrent=2), reader("r2", max_concurrent=1)])
    got = assigned(p)
    assert sorted(str(r) for r in got.values()) == ["r1", "r1", "r2"]
    assert set(got) == {"s0", "s1", "s2"}  # the earliest uids at equal urgency


# -- leases, shift end, capacity, deactivation ------------------------------------------


def test_expired_lease_releases_and_reassigns_to_another_reader() -> None:
    s = held("s1", "a", lease_expires_at=NOW - 3 * MIN)
    p = run([s], [reader("a"), reader("b", recent_rvu=30.0)])
    assert kinds(p) == [("release", "s1", "a"), ("assign", "s1", "b")]
    assert p.decisions[0].reasons == ("released: lease expired 3 min ago",)
    assert p.decisions[1].lease_expires_at == NOW + POLICY.lease_s(ROUTINE)


def test_expired_lease_is_not_handed_back_to_the_same_reader_this_round() -> None:
    s = held("s1", "a", lease_expires_at=NOW - 1 * MIN)
    p = run([s], [reader("a")], explain=True)
    assert kinds(p) == [("release", "s1", "a")]
    assert p.waiting == {"s1": "waiting: 1 just released by them"}


def test_expired_lease_releases_in_progress_studies_too() -> None:
    s = held("s1", "a", state=StudyState.IN_PROGRESS, lease_expires_at=NOW)
    p = run([s], [reader("a"), reader("b")])
    assert kinds(p) == [("release", "s1", "a"), ("assign", "s1", "b")]


def test_running_lease_is_left_alone() -> None:
    studies = [
        held("s1", "a"),
        held("s2", "a", state=StudyState.IN_PROGRESS, lease_expires_at=None),
    ]
    assert run(studies, [reader("a"), reader("b")]).decisions == []


def test_study_of_an_unknown_reader_returns_to_the_pool() -> None:
    p = run([held("s1", "ghost")], [reader("a")])
    assert kinds(p) == [("release", "s1", "ghost"), ("assign", "s1", "a")]
    assert p.decisions[0].reasons == ("released: reader ghost unknown",)


def test_shift_end_releases_assigned_but_not_in_progress_studies() -> None:
    # a works Wednesdays 02:00-10:00 UTC: at NOW (Wed 10:00) the shift has just ended
    a = reader("a", shifts=(Shift(2, time(2), time(10)),))
    studies = [held("waiting", "a"), held("open", "a", state=StudyState.IN_PROGRESS)]
    p = run(studies, [a, reader("b")])
    assert kinds(p) == [("release", "waiting", "a"), ("assign", "waiting", "b")]
    assert p.decisions[0].reasons == ("released: reader's shift ended",)


def test_capacity_reduction_releases_the_least_urgent_not_started_studies() -> None:
    studies = [
        held("started", "a", state=StudyState.IN_PROGRESS, deadline=NOW + 900 * MIN),
        held("stat", "a", priority=STAT, deadline=NOW + 25 * MIN),
        held("urgent", "a", priority=URGENT, deadline=NOW + 200 * MIN),
        held("routine", "a", deadline=NOW + 800 * MIN),
    ]
    p = run(studies, [reader("a", max_concurrent=2), reader("b")])
    releases = p.of_kind(DecisionKind.RELEASE)
    assert [(d.study_uid, d.radiologist) for d in releases] == [("routine", "a"), ("urgent", "a")]
    assert {d.reasons for d in releases} == {("released: capacity of a is 2",)}
    new = {d.study_uid: d.radiologist for d in p.of_kind(DecisionKind.ASSIGN)}
    assert new == {"routine": "b", "urgent": "b"}  # not handed back to a


def test_assigned_stat_moves_to_a_free_reader_who_starts_it_sooner() -> None:
    # a has 2 RVU of opened work before the STAT pushed to them (30 min); b is free
    studies = [
        held("opened", "a", state=StudyState.IN_PROGRESS, rvu=2.0),
        held("stat", "a", priority=STAT, deadline=NOW + 25 * MIN, rvu=2.0),
    ]
    no_interrupts = QueuePolicy(stat_interrupts=False)
    d = only(run(studies, [reader("a"), reader("b")], policy=no_interrupts), DecisionKind.REASSIGN)
    assert (d.study_uid, d.radiologist, d.previous) == ("stat", "b", "a")
    assert d.reasons[0] == "reassigned: b is free and would finish 15 min sooner than a"
    # readers set a case aside for a STAT that would otherwise finish inside its escalation
    # window (30 min > 25 - 10): a starts it now, as soon as b would -- it stays
    assert run(studies, [reader("a"), reader("b")]).decisions == []
    # nothing ahead of it with a: it stays
    assert run(studies[1:], [reader("a"), reader("b")]).decisions == []
    # routine work moves too when it saves rebalance_minutes (10): b finishes 15 min sooner
    routine = [studies[0], held("r", "a", deadline=NOW + 600 * MIN, rvu=2.0)]
    d = only(run(routine, [reader("a"), reader("b")]), DecisionKind.REASSIGN)
    assert (d.study_uid, d.radiologist, d.previous) == ("r", "b", "a")
    assert d.reasons[0] == "reassigned: b is free and would finish 15 min sooner than a"
    # ... not when it saves less, nor with the rule off
    assert run(routine, [reader("a"), reader("b")], policy=QueuePolicy(rebalance_minutes=20)) == (
        run(routine, [reader("a"), reader("b")], policy=QueuePolicy(rebalance_minutes=0))
    )
    assert (
        run(routine, [reader("a"), reader("b")], policy=QueuePolicy(rebalance_minutes=0)).decisions
        == []
    )
    # ... nor to a reader who is not free (b has 0.5 RVU open: 3.75 min)
    busy_b = [*routine, held("bb", "b", state=StudyState.IN_PROGRESS, rvu=0.5)]
    assert run(busy_b, [reader("a"), reader("b")]).of_kind(DecisionKind.REASSIGN) == []


def test_capacity_reduction_to_zero_releases_all_not_started() -> None:
    studies = [held("x", "a"), held("y", "a"), held("z", "a", state=StudyState.IN_PROGRESS)]
    p = run(studies, [reader("a", max_concurrent=0)])
    assert sorted(d.study_uid for d in p.of_kind(DecisionKind.RELEASE)) == ["x", "y"]
    assert assigned(p) == {}


def test_deactivation_releases_not_started_studies_and_stops_new_ones() -> None:
    studies = [held("x", "a"), held("y", "a", state=StudyState.IN_PROGRESS), study("new")]
    p = run(studies, [reader("a", active=False), reader("b", recent_rvu=99.0)])
    releases = p.of_kind(DecisionKind.RELEASE)
    assert [(d.study_uid, d.reasons) for d in releases] == [
        ("x", ("released: reader deactivated",))
    ]
    assert assigned(p) == {"x": "b", "new": "b"}


def test_release_reason_names_the_actual_ineligibility() -> None:
    s = held("x", "a", excluded=frozenset({"a"}))
    d = only(run([s], [reader("a"), reader("b")]), DecisionKind.RELEASE)
    assert "shift" not in d.reasons[0]
    assert "excluded" in d.reasons[0]


# -- escalation and pre-emptive reassignment ---------------------------------------------


def test_study_about_to_breach_is_escalated_once() -> None:
    s = study("s1", priority=STAT, deadline=NOW + 5 * MIN, modality="MR")
    p = run([s], [reader("a", modalities=frozenset({"CT"}))])
    d = only(p, DecisionKind.ESCALATE)
    assert (d.study_uid, d.radiologist) == ("s1", None)
    assert d.reasons == ("escalated: STAT 5 min left, unassigned",)
    already = study("s1", priority=STAT, deadline=NOW + 5 * MIN, escalated=True)
    assert run([already], [reader("a", shifts=())]).decisions == []


def test_held_and_late_studies_are_escalated_with_their_reader() -> None:
    s = held("s1", "a", priority=URGENT, deadline=NOW - 7 * MIN, state=StudyState.IN_PROGRESS)
    d = only(run([s], [reader("a")]), DecisionKind.ESCALATE)
    assert d.radiologist == "a"
    assert d.reasons == ("escalated: URGENT 7 min late, held by a",)


def test_no_escalation_with_time_to_spare() -> None:
    s = study("s1", priority=STAT, deadline=NOW + 11 * MIN, modality="MR")
    assert run([s], [reader("a", modalities=frozenset({"CT"}))]).decisions == []


def _overloaded() -> list[QueuedStudy]:
    # a has 16 RVU of STAT work open (2 h); their assigned routine study is due in 60 min
    return [
        held("big", "a", priority=STAT, state=StudyState.IN_PROGRESS, rvu=16.0),
        held("risk", "a", deadline=NOW + 60 * MIN, escalated=True),
    ]


def test_at_risk_assigned_study_moves_to_a_free_reader() -> None:
    p = run(_overloaded(), [reader("a"), reader("b")])
    d = only(p, DecisionKind.REASSIGN)
    assert (d.study_uid, d.radiologist, d.previous) == ("risk", "b", "a")
    assert d.reasons[0] == "reassigned: a would finish 68 min after the deadline"
    assert d.reasons[1].startswith("eligible: b ")
    assert d.reasons[-1] == "slack 60 min"
    assert d.lease_expires_at == NOW + POLICY.lease_s(ROUTINE)
    assert p.of_kind(DecisionKind.RELEASE) == []


def test_no_reassignment_when_the_current_reader_makes_the_deadline() -> None:
    studies = [held("risk", "a", deadline=NOW + 60 * MIN, escalated=True)]
    assert run(studies, [reader("a"), reader("b")]).decisions == []


def test_no_reassignment_of_an_opened_study() -> None:
    studies = _overloaded()
    studies[1] = held(
        "risk", "a", state=StudyState.IN_PROGRESS, deadline=NOW + 60 * MIN, escalated=True
    )
    assert run(studies, [reader("a"), reader("b")]).decisions == []


def test_no_reassignment_without_an_eligible_reader_with_room() -> None:
    readers = [
        reader("a"),
        reader("b", modalities=frozenset({"MR"})),
        reader("c", max_concurrent=0),
    ]
    assert run(_overloaded(), readers).decisions == []


def test_no_reassignment_when_the_other_reader_would_be_no_faster() -> None:
    studies = [*_overloaded(), held("b-big", "b", priority=STAT, rvu=20.0)]
    assert run(studies, [reader("a"), reader("b")]).of_kind(DecisionKind.REASSIGN) == []


def test_stat_gets_the_slot_freed_by_a_pre_emptive_reassignment() -> None:
    # a (CT+MR, 2 slots) holds an opened STAT (16 RVU) and an at-risk routine CT; b reads CT
    # only. The routine CT is moved to b, which frees a slot at a -- the only MR reader.
    studies = [
        *_overloaded(),
        study("mr-stat", priority=STAT, modality="MR", deadline=NOW + 30 * MIN),
    ]
    readers = [reader("a", max_concurrent=2), reader("b", modalities=frozenset({"CT"}))]
    p = run(studies, readers)
    assert only(p, DecisionKind.REASSIGN).previous == "a"
    assert assigned(p).get("mr-stat") == "a"


def test_at_risk_study_moves_to_a_reader_who_meets_the_deadline() -> None:
    policy = QueuePolicy(preferred_bonus_minutes=30)
    studies = [
        held("open", "a", state=StudyState.IN_PROGRESS, rvu=2.0),
        # due in 10 min; a finishes it in 22.5 min, b (preferred) too, c in 7.5 min
        held("risk", "a", deadline=NOW + 10 * MIN, escalated=True, preferred=frozenset({"b"})),
        held("b-work", "b", rvu=2.0),
    ]
    # without b the study goes to c ...
    assert assigned(run(studies[:2], [reader("a"), reader("c")], policy=policy)) == {"risk": "c"}
    # ... and a preferred reader who cannot help must not stop that
    readers = [reader("a"), reader("b"), reader("c")]
    assert assigned(run(studies, readers, policy=policy)) == {"risk": "c"}


def test_a_freed_slot_goes_to_the_waiting_stat_before_routine_work() -> None:
    studies = [
        held("open", "a", state=StudyState.IN_PROGRESS, rvu=5.0),
        # a would finish it in 45 min, due in 40: moved to b, which frees a slot at a
        held("risk", "a", deadline=NOW + 40 * MIN, escalated=True),
        study("mr-stat", priority=STAT, modality="MR", deadline=NOW + 30 * MIN),
        study("mr-routine", modality="MR"),  # due in 10 h
    ]
    readers = [reader("a", max_concurrent=2), reader("b", modalities=frozenset({"CT"}))]
    p = run(studies, readers)
    assert only(p, DecisionKind.REASSIGN).radiologist == "b"
    assert assigned(p).get("mr-stat") == "a"


# -- determinism ----------------------------------------------------------------------------


def _busy_round() -> tuple[list[QueuedStudy], list[Reader]]:
    studies = [
        held("l1", "a", lease_expires_at=NOW - MIN),
        held("l2", "b", lease_expires_at=NOW - 2 * MIN),
        held("l3", "a", lease_expires_at=NOW - 3 * MIN, priority=URGENT),
        study("n1", priority=STAT),
        study("n2", patient_key="p"),
    ]
    return studies, [reader("a"), reader("b"), reader("c")]


def test_same_input_same_plan() -> None:
    studies, readers = _busy_round()
    assert run(studies, readers, sticky={"p": "c"}) == run(studies, readers, sticky={"p": "c"})


def test_input_order_changes_only_the_order_of_releases() -> None:
    studies, readers = _busy_round()
    forward = run(studies, readers).decisions
    backward = run(studies[::-1], readers[::-1]).decisions
    assert sorted(map(repr, forward)) == sorted(map(repr, backward))
    assert [d for d in forward if d.kind is not DecisionKind.RELEASE] == [
        d for d in backward if d.kind is not DecisionKind.RELEASE
    ]


def test_input_order_does_not_change_the_plan() -> None:
    studies, readers = _busy_round()
    assert run(studies, readers).decisions == run(studies[::-1], readers[::-1]).decisions


def test_reader_whose_studies_were_all_released_is_free() -> None:
    studies = [
        held("big", "a", priority=STAT, rvu=2.5, lease_expires_at=NOW - MIN),
        held("small", "a", priority=STAT, rvu=0.6, lease_expires_at=NOW - MIN),
        study("mr", priority=STAT, modality="MR"),
    ]
    readers = [reader("a"), reader("b", modalities=frozenset({"MR"}))]
    # both have nothing ahead after the releases: the key decides
    assert assigned(run(studies, readers)) == {"mr": "a"}


# -- pull mode ------------------------------------------------------------------------------


def test_next_for_gives_the_most_urgent_study_the_reader_may_read() -> None:
    studies = [
        study("mr-stat", priority=STAT, modality="MR"),
        study("ct-urgent", priority=URGENT),
        study("ct-routine"),
        held("ct-held", "b", priority=STAT),
    ]
    readers = [reader("a", modalities=frozenset({"CT"})), reader("b")]
    d = next_for(NOW, "a", studies, readers, POLICY)
    assert d is not None
    assert (d.kind, d.study_uid, d.radiologist) == (DecisionKind.ASSIGN, "ct-urgent", "a")
    assert d.reasons[1] == "chosen: most urgent study they may read"
    assert d.reasons[2] == "slack 10.0 h"
    assert d.lease_expires_at == NOW + POLICY.lease_s(URGENT)


def test_next_for_nothing_at_capacity_off_shift_or_unknown() -> None:
    studies = [held("x", "a"), study("s", priority=STAT)]
    full = with_load(reader("a", max_concurrent=1), studies)
    assert next_for(NOW, "a", studies, [full], POLICY) is None
    assert next_for(NOW, "a", studies, [reader("a", shifts=())], POLICY) is None
    assert next_for(NOW, "nobody", studies, [reader("a")], POLICY) is None
    assert next_for(NOW, "a", [study("s", modality="US")], [reader("a")], POLICY) is None


def test_next_for_skips_studies_over_the_backlog_but_takes_stat() -> None:
    studies = [
        held("x", "a", rvu=10.0),
        study("routine", deadline=NOW),
        study("stat", priority=STAT),
    ]
    # the aged routine study (class STAT, due now) comes first but would exceed the backlog
    loaded = with_load(reader("a"), studies)
    d = next_for(NOW, "a", studies, [loaded], POLICY)
    assert d is not None and d.study_uid == "stat"


# -- shifts -------------------------------------------------------------------------------


def test_shift_across_midnight() -> None:
    r = reader("r", shifts=(Shift(2, time(22), time(6)),))  # Wednesday 22:00 - Thursday 06:00
    assert not shift_status(r, utc("2024-05-15T21:59")).on_shift
    status = shift_status(r, utc("2024-05-16T03:00"))
    assert status.on_shift and not status.on_call
    assert status.ends_at == utc("2024-05-16T06:00")
    assert not shift_status(r, utc("2024-05-16T06:00")).on_shift
    assert not shift_status(r, utc("2024-05-16T22:30")).on_shift  # Thursday: no shift


def test_sunday_night_shift_runs_into_monday() -> None:
    r = reader("r", shifts=(Shift(6, time(22), time(6), on_call=True),))
    status = shift_status(r, utc("2024-05-20T02:00"))  # Monday
    assert status.on_call and not status.on_shift
    assert status.ends_at == utc("2024-05-20T06:00")
    assert not shift_status(r, utc("2024-05-21T02:00")).on_call  # Tuesday: nothing


def test_shift_in_the_readers_time_zone() -> None:
    r = reader("r", timezone="Asia/Ho_Chi_Minh", shifts=(Shift(0, time(7), time(15)),))
    assert shift_status(r, utc("2024-05-20T00:00")).on_shift  # Monday 07:00 in Hanoi
    assert not shift_status(r, utc("2024-05-19T23:59")).on_shift
    assert shift_status(r, utc("2024-05-20T00:00")).ends_at == utc("2024-05-20T08:00")


def test_overnight_shift_over_the_spring_dst_change_in_paris() -> None:
    # Saturday 30 March 2024 22:00 CET -> Sunday 06:00 CEST is 7 real hours
    r = reader("r", timezone="Europe/Paris", shifts=(Shift(5, time(22), time(6)),))
    assert shift_status(r, utc("2024-03-30T21:00")).on_shift
    status = shift_status(r, utc("2024-03-31T03:59"))
    assert status.on_shift
    assert status.ends_at == utc("2024-03-31T04:00")
    assert not shift_status(r, utc("2024-03-31T04:00")).on_shift


def test_overnight_shift_over_the_autumn_dst_change_in_paris() -> None:
    # Saturday 26 October 2024 22:00 CEST -> Sunday 06:00 CET is 9 real hours
    r = reader("r", timezone="Europe/Paris", shifts=(Shift(5, time(22), time(6)),))
    assert shift_status(r, utc("2024-10-26T20:00")).on_shift
    status = shift_status(r, utc("2024-10-27T04:30"))
    assert status.on_shift
    assert status.ends_at == utc("2024-10-27T05:00")
    assert not shift_status(r, utc("2024-10-27T05:00")).on_shift


def test_day_shift_on_the_dst_day_keeps_local_hours() -> None:
    r = reader("r", timezone="Europe/Paris", shifts=(Shift(6, time(8), time(16)),))
    assert not shift_status(r, local("2024-03-31T07:59", "Europe/Paris")).on_shift
    status = shift_status(r, local("2024-03-31T08:00", "Europe/Paris"))
    assert status.on_shift
    assert status.ends_at == utc("2024-03-31T14:00")  # 16:00 CEST


def test_shift_ending_in_the_repeated_hour_ends_once() -> None:
    r = reader("r", timezone="Europe/Paris", shifts=(Shift(5, time(22), time(2, 30)),))
    first = shift_status(r, utc("2024-10-27T00:15"))  # 02:15 CEST
    assert first.on_shift and first.ends_at == utc("2024-10-27T00:30")
    again = shift_status(r, utc("2024-10-27T01:15"))  # 02:15 CET, 45 min after the end
    assert not again.on_shift or (
        again.ends_at is not None and again.ends_at > utc("2024-10-27T01:15")
    )


def test_shift_starting_in_the_repeated_hour_does_not_pause() -> None:
    r = reader("r", timezone="Europe/Paris", shifts=(Shift(6, time(2, 30), time(10)),))
    assert shift_status(r, utc("2024-10-27T00:45")).on_shift  # 02:45 CEST: started
    assert shift_status(r, utc("2024-10-27T01:15")).on_shift  # 02:15 CET, 45 min later


def test_shift_ending_in_the_spring_gap_reports_when_it_really_ends() -> None:
    r = reader("r", timezone="Europe/Paris", shifts=(Shift(6, time(1), time(2, 30)),))
    status = shift_status(r, utc("2024-03-31T00:30"))  # 01:30 CET
    assert status.on_shift and status.ends_at is not None
    # still on shift up to ends_at
    assert shift_status(r, status.ends_at - 60).on_shift


def test_whole_day_shift() -> None:
    r = reader("r", shifts=(Shift(2, time(0), time(0)),))  # Wednesday 00:00-24:00
    assert shift_status(r, utc("2024-05-15T00:00")).on_shift
    status = shift_status(r, utc("2024-05-15T23:59"))
    assert status.on_shift and status.ends_at == utc("2024-05-16T00:00")
    assert not shift_status(r, utc("2024-05-16T00:00")).on_shift
    assert not shift_status(r, utc("2024-05-14T23:59")).on_shift


def test_regular_shift_wins_over_an_overlapping_on_call() -> None:
    shifts = (Shift(2, time(0), time(0), on_call=True), Shift(2, time(8), time(16)))
    r = reader("r", shifts=shifts)
    day = shift_status(r, utc("2024-05-15T10:00"))
    assert (day.on_shift, day.on_call, day.ends_at) == (True, False, utc("2024-05-15T16:00"))
    evening = shift_status(r, utc("2024-05-15T18:00"))
    assert (evening.on_shift, evening.on_call, evening.ends_at) == (
        False,
        True,
        utc("2024-05-16T00:00"),
    )


def test_of_two_overlapping_shifts_the_later_end_counts() -> None:
    r = reader("r", shifts=(Shift(1, time(20), time(4)), Shift(2, time(0), time(8))))
    assert shift_status(r, utc("2024-05-15T02:00")).ends_at == utc("2024-05-15T08:00")


def test_no_shifts_means_off() -> None:
    status = shift_status(reader("r", shifts=()), NOW)
    assert (status.on_shift, status.on_call, status.ends_at) == (False, False, None)


def test_on_shift_seconds() -> None:
    weekdays = tuple(Shift(d, time(8), time(16)) for d in range(5))
    r = reader("r", shifts=weekdays)
    wed = utc("2024-05-15T00:00")
    assert on_shift_seconds(r, wed, wed + 12 * 3600) == 4 * 3600  # 08:00-12:00
    assert on_shift_seconds(r, utc("2024-05-13T00:00"), utc("2024-05-20T00:00")) == 40 * 3600
    assert on_shift_seconds(r, utc("2024-05-18T00:00"), utc("2024-05-20T00:00")) == 0  # weekend
    assert on_shift_seconds(r, wed + 3600, wed) == 0
    assert on_shift_seconds(reader("r", shifts=()), wed, wed + 86400) == 0


def test_on_shift_seconds_counts_overlaps_once_and_on_call_too() -> None:
    shifts = (Shift(2, time(0), time(0), on_call=True), Shift(2, time(8), time(16)))
    wed = utc("2024-05-15T00:00")
    assert on_shift_seconds(reader("r", shifts=shifts), wed, wed + 12 * 3600) == 12 * 3600
    night = reader("r", shifts=(Shift(1, time(22), time(6)),))  # Tuesday night
    assert on_shift_seconds(night, wed, wed + 12 * 3600) == 6 * 3600


def test_on_shift_seconds_over_dst_nights_in_paris() -> None:
    r = reader("r", timezone="Europe/Paris", shifts=(Shift(5, time(22), time(6)),))
    spring = on_shift_seconds(r, utc("2024-03-30T12:00"), utc("2024-03-31T12:00"))
    autumn = on_shift_seconds(r, utc("2024-10-26T12:00"), utc("2024-10-27T12:00"))
    assert (spring, autumn) == (7 * 3600, 9 * 3600)


# -- licences, gini, policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("licence", "jurisdiction", "covers"),
    [
        ("VN", "VN", True),
        ("VN", "VN-HN", True),
        ("VN-HN", "VN-HN", True),
        ("VN-HN", "VN", False),
        ("VN-HN", "VN-SG", False),
        ("VN", "VNM", False),
        ("KH", "KH-12", True),
        ("KH-1", "KH-12", False),
        ("VN", "", False),  # no jurisdiction: no one, until an admin sets it
    ],
)
def test_licence_covers(licence: str, jurisdiction: str, covers: bool) -> None:
    assert licence_covers(licence, jurisdiction) is covers


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_gini_one_does_all(n: int) -> None:
    assert gini([0.0] * (n - 1) + [7.0]) == pytest.approx((n - 1) / n)


def test_gini_equal_and_degenerate() -> None:
    assert gini([3.0, 3.0, 3.0]) == pytest.approx(0.0)
    assert gini([]) == 0.0
    assert gini([0.0, 0.0]) == 0.0
    assert gini([1.0, float("nan"), 1.0]) == pytest.approx(0.0)
    assert 0.0 < gini([1.0, 2.0, 3.0]) < 2 / 3


def test_rvu_table_defaults() -> None:
    assert POLICY.classify("CT", "HEAD") == ("neuro", 0.85)
    assert POLICY.classify("CR", "CHEST") == ("", 0.22)
    ct_head, cr_chest = POLICY.classify("CT", "HEAD")[1], POLICY.classify("CR", "CHEST")[1]
    assert ct_head > 3 * cr_chest
    assert POLICY.classify(" ct ", "head") == ("neuro", 0.85)
    assert POLICY.classify("CT", "CSPINE") == ("neuro", 0.85)  # *SPINE
    assert POLICY.classify("CT", "head neck") == ("neuro", 0.85)  # spaces dropped
    assert POLICY.classify("CT", "LOWERABDOMEN") == ("", 1.75)  # *ABD*
    assert POLICY.classify("CT", "KNEE") == ("", 1.2)  # the CT catch-all
    assert POLICY.classify("MR", "KNEE") == ("msk", 1.4)
    assert POLICY.classify("MG", "BREAST") == ("breast", 0.7)
    assert POLICY.classify("XA", "HEART") == ("", POLICY.default_rvu)


def test_rvu_table_is_configurable_and_first_match_wins() -> None:
    policy = QueuePolicy(
        procedures=[
            ProcedureRule(modality="ct", body_parts=["head*"], subspecialty="neuro", rvu=2.0),
            ProcedureRule(modality="CT", body_parts=["HEADNECK"], rvu=9.0),
        ],
        default_rvu=0.3,
    )
    assert policy.classify("CT", "HEADNECK") == ("neuro", 2.0)
    assert policy.classify("CT", "CHEST") == ("", 0.3)


def test_policy_needs_every_priority() -> None:
    with pytest.raises(ValidationError, match=r"missing \['routine'\]"):
        QueuePolicy(sla_minutes={"stat": 30, "urgent": 240})
    with pytest.raises(ValidationError, match=r"unknown \['asap'\]"):
        QueuePolicy(lease_minutes={"stat": 5, "urgent": 15, "routine": 30, "asap": 1})


@pytest.mark.parametrize("field", ["sla_minutes", "lease_minutes", "escalate_minutes"])
@pytest.mark.parametrize("bad", [-5, 0])
def test_policy_minutes_must_be_positive(field: str, bad: float) -> None:
    with pytest.raises(ValidationError, match="minutes must be positive"):
        QueuePolicy.model_validate({field: {"stat": bad, "urgent": 15, "routine": 30}})


@pytest.mark.parametrize(
    "make",
    [
        lambda: QueuePolicy(max_backlog_minutes=-5),
        lambda: QueuePolicy(preferred_bonus_minutes=-10),
        lambda: QueuePolicy(sticky_days=-1),
        lambda: QueuePolicy(fairness_weight=-0.5),
        lambda: QueuePolicy(default_rvu=-1),
        lambda: ProcedureRule(modality="CT", rvu=-2),
    ],
    ids=["backlog", "preferred-bonus", "sticky-days", "fairness", "default-rvu", "rule-rvu"],
)
def test_policy_refuses_negative_minutes_and_rvu(make: object) -> None:
    with pytest.raises(ValidationError):
        make()  # type: ignore[operator]


def test_on_call_priorities_are_normalised_and_checked() -> None:
    assert QueuePolicy(on_call_priorities=["STAT", "Urgent"]).on_call_takes(STAT)
    with pytest.raises(ValidationError):
        QueuePolicy(on_call_priorities=["asap"])


def test_policy_priority_names_are_case_insensitive() -> None:
    policy = QueuePolicy(sla_minutes={"STAT": 20, "Urgent": 120, "routine": 720})
    assert policy.sla_s(STAT) == 1200.0
    assert policy.sla_s(ROUTINE) == 720 * 60.0


def test_station_sla_override() -> None:
    assert POLICY.sla_s(STAT) == 30 * 60.0
    assert POLICY.sla_s(STAT, {"stat": 20}) == 20 * 60.0
    assert POLICY.sla_s(URGENT, {"stat": 20}) == 240 * 60.0
    assert POLICY.sla_s(ROUTINE, {}) == 1440 * 60.0


def test_policy_on_call_and_lease_helpers() -> None:
    assert POLICY.on_call_takes(STAT) and POLICY.on_call_takes(URGENT)
    assert not POLICY.on_call_takes(ROUTINE)
    assert POLICY.lease_s(STAT) < POLICY.lease_s(URGENT) < POLICY.lease_s(ROUTINE)
    assert POLICY.escalate_s(STAT) == 600.0


def test_every_reason_is_non_empty_text() -> None:
    studies, readers = _busy_round()
    due = study("due", priority=URGENT, deadline=NOW + 30 * MIN)
    p = run([*studies, *_overloaded(), due], [*readers, reader("d", modalities=frozenset({"CT"}))])
    assert {d.kind for d in p.decisions} >= {
        DecisionKind.RELEASE,
        DecisionKind.ASSIGN,
        DecisionKind.ESCALATE,
        DecisionKind.REASSIGN,
    }
    for d in p.decisions:
        assert d.reasons, d
        assert all(re.match(r"^[a-z]+: \S", why) or why.startswith("slack ") for why in d.reasons)


def test_free_readers_share_routine_work_by_recent_utilisation() -> None:
    # both free; "fast" would finish first but has read 2.5 h of the last 12 h
    readers = [reader("fast", rvu_per_hour=16.0, recent_rvu=40.0), reader("slow")]
    d = only(run([study("new")], readers), DecisionKind.ASSIGN)
    assert d.radiologist == "slow"
    assert d.reasons[1].startswith("chosen: free now and least busy lately (0%")
    # STAT: the earliest finish, whatever the fairness
    assert assigned(run([study("stat", priority=STAT)], readers)) == {"stat": "fast"}
    # without a fairness weight the earliest finish wins for routine work too
    policy = QueuePolicy(fairness_weight=0.0)
    assert assigned(run([study("new")], readers, policy=policy)) == {"new": "fast"}


# -- STAT: setting a case aside, making room -----------------------------------------------


def test_stat_goes_to_a_faster_reader_who_sets_the_case_in_hand_aside() -> None:
    # fast has 3 RVU of routine CT open (15 min at 12/h); slow is free (25 min for the STAT)
    opened = held("opened", "fast", state=StudyState.IN_PROGRESS, rvu=3.0, started_at=NOW)
    stat = study("stat", priority=STAT, deadline=NOW + 20 * MIN, rvu=2.5)
    readers = [reader("fast", rvu_per_hour=12.0), reader("slow", rvu_per_hour=6.0)]
    d = only(run([opened, stat], readers), DecisionKind.ASSIGN)
    # 12.5 min + the 2-min interruption penalty against 25 min
    assert d.radiologist == "fast"
    assert d.reasons[1].startswith("chosen: earliest finish (12 min of work")
    assert "nobody free would finish it before the escalation window" in d.reasons[1]
    assert d.reasons[1].endswith("; they set the case in hand aside for it")
    # when readers do not interrupt, fast would be done in 27.5 min: slow is quicker
    no_interrupts = QueuePolicy(stat_interrupts=False)
    d = only(run([opened, stat], readers, policy=no_interrupts), DecisionKind.ASSIGN)
    assert d.radiologist == "slow"
    # an interruption must save more than its penalty: 12.5 + 15 > 25
    costly = QueuePolicy(interrupt_penalty_minutes=15)
    assert only(run([opened, stat], readers, policy=costly), DecisionKind.ASSIGN).radiologist == (
        "slow"
    )


def test_no_interruption_when_waiting_leaves_the_stat_clear_of_its_window() -> None:
    # 0.5 RVU left in hand: fast would finish the STAT 15 min from now, 45 min before its
    # window opens -- they finish their case first, and a free reader on shift who would
    # be done in time gets it before a busy one
    opened = held("opened", "fast", state=StudyState.IN_PROGRESS, rvu=0.5, started_at=NOW)
    stat = study("stat", priority=STAT, deadline=NOW + 70 * MIN, rvu=2.5)
    fast = reader("fast", rvu_per_hour=12.0)
    d = only(run([opened, stat], [fast]), DecisionKind.ASSIGN)
    assert d.radiologist == "fast"
    assert "aside" not in d.reasons[1]
    d = only(run([opened, stat], [fast, reader("slow", rvu_per_hour=6.0)]), DecisionKind.ASSIGN)
    assert d.radiologist == "slow"  # free, 25 min, clear of the window
    # a STAT in hand is never set aside for another: the new one waits for it
    first = replace(opened, uid="first", priority=STAT, rvu=3.0)
    soon = replace(stat, deadline=NOW + 20 * MIN)
    d = only(run([first, soon], [fast]), DecisionKind.ASSIGN)
    assert d.reasons[1].startswith("chosen: earliest finish (28 min of work")
    assert "aside" not in d.reasons[1]


def test_a_full_reader_makes_room_for_a_stat_they_would_finish_first() -> None:
    # fast is at capacity (2): a routine CT open and a chest X-ray not opened yet; slow has
    # room and would take 25 min, inside the window of a 20-min deadline
    opened = held("opened", "fast", state=StudyState.IN_PROGRESS, rvu=3.0, started_at=NOW)
    waiting = held("cxr", "fast", rvu=0.22)
    stat = study("stat", priority=STAT, deadline=NOW + 20 * MIN, rvu=2.5)
    readers = [
        reader("fast", rvu_per_hour=12.0, max_concurrent=2),
        reader("slow", rvu_per_hour=6.0),
    ]
    p = run([opened, waiting, stat], readers)
    assert kinds(p) == [("reassign", "cxr", "slow"), ("assign", "stat", "fast")]
    move, give = p.decisions
    assert move.previous == "fast"
    assert move.reasons[0] == "moved: makes room on fast for STAT stat"
    assert give.reasons[1].startswith("chosen: earliest finish (12 min of work")
    assert "2 eligible, 1 of them full" in give.reasons[1]
    # nobody else may take the X-ray: it goes back to the pool
    only_fast = [readers[0], reader("slow", rvu_per_hour=6.0, modalities=frozenset({"CT"}))]
    p = run([opened, replace(waiting, modality="CR"), stat], only_fast)
    assert kinds(p) == [("release", "cxr", "fast"), ("assign", "stat", "fast")]
    # the reader with room would be done clear of the window (70-min deadline): no move
    relaxed = replace(stat, deadline=NOW + 70 * MIN)
    assert kinds(run([opened, waiting, relaxed], readers)) == [("assign", "stat", "slow")]
    # nothing unopened to move (the case in hand is never taken away): the STAT waits for
    # nobody -- slow gets it
    assert kinds(run([opened, stat], [replace(readers[0], max_concurrent=1), readers[1]])) == [
        ("assign", "stat", "slow")
    ]
    # a STAT is never moved to make room for another
    other = held("other-stat", "fast", priority=STAT, rvu=0.2, deadline=NOW + 25 * MIN)
    p = run([opened, other, stat], readers)
    assert ("reassign", "other-stat", "slow") not in kinds(p)
    assert all(not d.reasons[0].startswith("moved: makes room") for d in p.decisions)


def test_room_is_made_only_in_time_and_only_by_moving_less_urgent_work() -> None:
    opened = held("opened", "fast", state=StudyState.IN_PROGRESS, rvu=3.0, started_at=NOW)
    stat = study("stat", priority=STAT, deadline=NOW + 30 * MIN, rvu=2.5)
    fast = reader("fast", rvu_per_hour=12.0, max_concurrent=2)
    cr_only_full = reader("cr", modalities=frozenset({"CR"}), max_concurrent=1)
    cr_work = held("cr-work", "cr", modality="CR", rvu=0.22)
    # nobody has room: a routine X-ray with hours to go makes room for the STAT
    waiting = held("cxr", "fast", modality="CR", rvu=0.22)
    p = run([opened, waiting, cr_work, stat], [fast, cr_only_full])
    assert kinds(p) == [("release", "cxr", "fast"), ("assign", "stat", "fast")]
    # after the 15 min in hand it would be done at 27.5 min, inside the window (20): aside
    assert p.decisions[1].sets_aside is True
    # an URGENT X-ray aged into the STAT class with less slack than the STAT is not moved
    # for it (the reader would read it first anyway), nor anything about to breach
    urgent = replace(waiting, priority=URGENT, deadline=NOW + 20 * MIN, escalated=True)
    assert kinds(run([opened, urgent, cr_work, stat], [fast, cr_only_full])) == []
    at_risk = replace(waiting, deadline=NOW + 200 * MIN, escalated=True)  # 240 min: at risk
    assert kinds(run([opened, at_risk, cr_work, stat], [fast, cr_only_full])) == []
    # a full reader whose shift ends before they could open the STAT gets nothing moved
    ends_soon = replace(
        fast, shifts=(Shift(2, time(6, 0), time(10, 5)),)
    )  # Wednesday until 10:05; 15 min of work in hand, 2 min with the case set aside
    slow = reader("slow", rvu_per_hour=1.0)
    late_stat = replace(stat, deadline=NOW + 65 * MIN, rvu=1.0)  # slow: 60 min, in the window
    held_stat = held("first", "fast", priority=STAT, state=StudyState.IN_PROGRESS, rvu=2.0)
    p = run([held_stat, waiting, late_stat], [ends_soon, slow])
    assert ("release", "cxr", "fast") not in kinds(p)
    assert assigned(p).get("stat") == "slow"


def test_a_reader_on_a_stat_does_not_set_anything_aside_for_the_next() -> None:
    # on a STAT (1 RVU left), a routine case already aside (2 RVU): a new STAT comes after the
    # STAT work only, and nothing new is set aside
    on_stat = held("on-stat", "a", priority=STAT, state=StudyState.IN_PROGRESS, rvu=1.0)
    aside = held("aside", "a", state=StudyState.IN_PROGRESS, rvu=2.0)
    stat = study("stat", priority=STAT, deadline=NOW + 20 * MIN, rvu=1.0)
    d = only(run([on_stat, aside, stat], [reader("a", rvu_per_hour=12.0)]), DecisionKind.ASSIGN)
    assert d.sets_aside is False
    assert "aside" not in d.reasons[1]
    assert d.reasons[1].startswith("chosen: earliest finish (10 min of work")
