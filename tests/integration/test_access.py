"""The one access rule (reading_queue.access) on real databases, checked against an oracle
built from the worklist engine's own eligibility function: for a random worklist, every
radiologist, clinic and admin sees exactly what the rule says, no more and no less."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from reading_queue.access import Access
from reading_queue.accounts import Principal
from reading_queue.models import HubStudy, Study, make_engine
from reading_queue.worklist.engine import ShiftStatus, _static_ineligibility
from reading_queue.worklist.policy import QueuePolicy
from reading_queue.worklist.roster import RadiologistSpec
from reading_queue.worklist.service import Worklist
from reading_queue.worklist.store import _queued
from tests.support.peers import PostgresCluster, postgres_bin_dir
from tests.support.worklist_data import NewStudy, announce_studies, reader, station

T0 = 1_790_000_000.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster | None]:
    if postgres_bin_dir() is None:
        yield None
        return
    with PostgresCluster() as cluster:
        yield cluster


_n = iter(range(10_000))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.needs_postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg: PostgresCluster | None) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    assert pg is not None
    return pg.create_database(f"acc_{next(_n)}")


def who(role: str, *, radiologist: str | None = None, station: str | None = None) -> Principal:
    return Principal(1, f"{role}-user", role, radiologist, station)


def build(url: str, seed: int) -> tuple[Worklist, list[RadiologistSpec]]:
    """A mixed worklist: some studies assigned, some reported, patients with several
    studies at one or two institutions, a station excluding a reader, one station without
    jurisdiction, one study still arriving (not yet on the worklist)."""
    rng = random.Random(seed)
    wl = Worklist(make_engine(url), QueuePolicy(), clock=lambda: T0)
    readers = [
        reader("dr-vn", licences=["VN"], languages=["vi", "en"], subspecialties=["neuro"]),
        reader("dr-hn", licences=["VN-HN"], languages=["vi"], subspecialties=[]),
        reader("dr-kh", licences=["KH"], languages=["km"], modalities=["CR"]),
        reader("dr-off", licences=["VN"], languages=["vi"], active=False),
    ]
    for spec in readers:
        wl.upsert_radiologist(spec)
    wl.configure_station(station("hn-1", jurisdiction="VN-HN", institution="Hanoi North"))
    wl.configure_station(station("sg-1", jurisdiction="VN-SG", institution="Saigon"))
    wl.configure_station(station("kh-1", jurisdiction="KH-12", language="km", institution="Kampot"))
    wl.configure_station(
        station("hn-2", jurisdiction="VN-HN", institution="Hanoi North", excluded=["dr-hn"])
    )
    wl.configure_station(station("nowhere", jurisdiction="", institution="Nowhere"))
    names = ["hn-1", "sg-1", "kh-1", "hn-2", "nowhere"]
    studies = [
        NewStudy(
            uid=f"2.25.{seed}.{i}",
            station=rng.choice(names),
            modality=rng.choice(["CR", "CT", "MR"]),
            priority=rng.choice([0, 1, 2]),
        )
        for i in range(120)
    ]
    announce_studies(wl.engine, studies, T0 - 600)
    wl.consume_events(now=T0 - 600)
    with wl.engine.begin() as conn:
        # Patients: 30 keys spread over the studies; subspecialties on some
        for st in studies:
            conn.execute(
                update(Study)
                .where(Study.study_uid == st.uid)
                .values(
                    patient_key=f"pk-{rng.randrange(30)}" if rng.random() < 0.9 else "",
                    subspecialty="neuro" if rng.random() < 0.2 else "",
                )
            )
        # Some assigned / reported by each reader (whatever their eligibility: an admin
        # may assign by hand), some cancelled
        uids = [st.uid for st in studies]
        rng.shuffle(uids)
        for uid, (assignee, state) in zip(
            uids,
            [
                ("dr-vn", "assigned"),
                ("dr-vn", "final"),
                ("dr-hn", "in_progress"),
                ("dr-kh", "preliminary"),
                ("dr-off", "assigned"),
                (None, "cancelled"),
                (None, "received"),
            ]
            * 4,
            strict=False,
        ):
            conn.execute(
                update(Study).where(Study.study_uid == uid).values(assignee=assignee, state=state)
            )
    announce_studies(
        wl.engine,
        [NewStudy(uid=f"2.25.{seed}.arriving", station="hn-1")],
        T0,
    )
    with wl.engine.begin() as conn:
        conn.execute(
            update(HubStudy)
            .where(HubStudy.study_uid == f"2.25.{seed}.arriving")
            .values(state="receiving")
        )
    return wl, readers


def oracle(wl: Worklist, spec: RadiologistSpec) -> set[str]:
    """What the rule says, from the engine's eligibility (on shift: shifts do not matter)."""
    with wl.engine.connect() as conn:
        rows = list(conn.execute(select(Study)))
        stations = {s.name: (frozenset(s.preferred), frozenset(s.excluded)) for s in wl.stations()}
    on = ShiftStatus(on_shift=True, on_call=False)
    eng_reader = spec.reader()
    own = {
        r.study_uid
        for r in rows
        if r.assignee == spec.key
        or (
            r.state == "ready"
            and _static_ineligibility(eng_reader, on, _queued(r, stations), QueuePolicy()) is None
        )
    }
    anchors = {(r.patient_key, r.institution) for r in rows if r.study_uid in own}
    priors = {
        r.study_uid for r in rows if r.patient_key and (r.patient_key, r.institution) in anchors
    }
    return own | priors


@pytest.mark.parametrize("seed", [1, 2])
def test_each_role_sees_exactly_what_the_rule_says(db_url: str, seed: int) -> None:
    wl, readers = build(db_url, seed)
    access = Access(wl.engine)
    with wl.engine.connect() as conn:
        every = set(conn.scalars(select(HubStudy.study_uid)))
        by_station: dict[str, set[str]] = {}
        for uid, name in conn.execute(select(HubStudy.study_uid, HubStudy.station)):
            by_station.setdefault(name, set()).add(uid)

    assert access.filter(who("admin"), every) == every
    for name, uids in by_station.items():
        assert access.filter(who("clinic", station=name), every) == uids
    for spec in readers:
        expected = oracle(wl, spec)
        got = access.filter(who("radiologist", radiologist=spec.key), every)
        assert got == expected, spec.key
    # the rule is not vacuous here: pools, own studies and priors all occur
    vn = oracle(wl, readers[0])
    assert len(vn) > 10 and vn != every

    # An arriving study is its clinic's, nobody else's but the admin's
    arriving = f"2.25.{seed}.arriving"
    assert access.can_see(who("clinic", station="hn-1"), arriving)
    assert access.can_see(who("admin"), arriving)
    assert not any(access.can_see(who("radiologist", radiologist=r.key), arriving) for r in readers)


def test_callers_without_a_binding_see_nothing(db_url: str) -> None:
    wl, _ = build(db_url, 3)
    access = Access(wl.engine)
    with wl.engine.connect() as conn:
        every = set(conn.scalars(select(HubStudy.study_uid)))
    for nobody in (
        who("clinic"),  # no station
        who("radiologist"),  # no roster key
        who("radiologist", radiologist="not-on-the-roster"),
        who("clinic", station="no-such-station"),
        who("visitor"),  # unknown role
    ):
        assert access.filter(nobody, every) == set(), nobody
    # unknown UIDs are simply absent, for everyone
    assert access.filter(who("admin"), ["2.25.999"]) == set()
    # an inactive reader keeps only what is theirs (and its priors): no pool
    off = access.filter(who("radiologist", radiologist="dr-off"), every)
    with wl.engine.connect() as conn:
        assigned = set(conn.scalars(select(Study.study_uid).where(Study.assignee == "dr-off")))
        ready = set(conn.scalars(select(Study.study_uid).where(Study.state == "ready")))
    assert assigned <= off
    assert not (off - assigned) & ready - _priors_of(wl, assigned)


def _priors_of(wl: Worklist, uids: set[str]) -> set[str]:
    with wl.engine.connect() as conn:
        rows = list(conn.execute(select(Study.study_uid, Study.patient_key, Study.institution)))
    anchors = {(k, i) for u, k, i in rows if u in uids and k}
    return {u for u, k, i in rows if (k, i) in anchors}


def test_one_callers_answer_is_reused_for_two_seconds_only(db_url: str) -> None:
    wl, _ = build(db_url, 4)
    now = [1000.0]
    access = Access(wl.engine, clock=lambda: now[0])
    lan = who("radiologist", radiologist="dr-vn")
    with wl.engine.connect() as conn:
        uid = conn.scalar(select(Study.study_uid).where(Study.assignee == "dr-vn"))
    assert uid is not None and access.can_see(lan, uid)
    with wl.engine.begin() as conn:  # reassigned away (and no pool or prior path to it)
        conn.execute(
            update(Study)
            .where(Study.study_uid == uid)
            .values(assignee="dr-kh", state="assigned", patient_key="")
        )
    assert access.can_see(lan, uid)  # the answer of a moment ago
    now[0] += 2.5
    assert not access.can_see(lan, uid)
    assert not access.filter(lan, [uid])  # searches never use the reused answers
