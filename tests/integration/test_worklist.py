"""The worklist service on real databases: SQLite (default) and a PostgreSQL cluster the test
starts. Studies arrive through the ingest outbox, decisions come from the engine, every
transition is checked and recorded."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from reading_queue.models import make_engine
from reading_queue.worklist.policy import QueuePolicy
from reading_queue.worklist.roster import ShiftSpec
from reading_queue.worklist.service import NotEligible, StaleState, UnknownRadiologist, Worklist
from telerad.core.priority import Priority
from tests.support.peers import PostgresCluster, postgres_bin_dir
from tests.support.worklist_data import NewStudy, announce_studies, reader, station

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=ZoneInfo("Asia/Ho_Chi_Minh")).timestamp()  # Monday


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster | None]:
    if postgres_bin_dir() is None:
        yield None
        return
    with PostgresCluster() as cluster:
        yield cluster


_db_counter = iter(range(10_000))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.needs_postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg: PostgresCluster | None) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    assert pg is not None, "the needs_postgres mark on this param is checked first"
    return pg.create_database(f"wl_{next(_db_counter)}")


def make_worklist(url: str, **kw: Any) -> Worklist:
    return Worklist(make_engine(url), kw.pop("policy", QueuePolicy()), clock=lambda: T0, **kw)


def kinds(wl: Worklist, uid: str) -> list[str]:
    return [e.kind for e in wl.history(uid)]


def test_intake_deadlines_and_push_assignment(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram-hn", sla_minutes={"stat": 20}, institution="BV Bach Mai"))
    wl.configure_station(station("tram-kh", jurisdiction="KH-12", language="km"))
    wl.upsert_radiologist(reader("dr-lan"))
    wl.upsert_radiologist(reader("dr-sok", licences=["KH"], languages=["km"], subspecialties=[]))
    announce_studies(
        wl.engine,
        [
            NewStudy("1.1", "tram-hn", "CT", "HEAD", Priority.STAT),
            NewStudy("1.2", "tram-hn", "CR", "CHEST", Priority.ROUTINE),
            NewStudy("1.3", "tram-kh", "CT", "HEAD", Priority.URGENT),
        ],
        at=T0,
    )
    assert wl.consume_events(now=T0) == 3
    assert wl.consume_events(now=T0) == 0  # consumed once
    stat = wl.study("1.1")
    assert stat.state == "ready"
    assert stat.deadline == pytest.approx(T0 + 20 * 60)  # the station's contract
    assert (stat.subspecialty, stat.rvu, stat.jurisdiction) == ("neuro", 0.85, "VN-HN")
    assert wl.study("1.2").deadline == pytest.approx(T0 + 24 * 3600)
    assert wl.study("1.3").deadline == pytest.approx(T0 + 4 * 3600)

    result = wl.run_round(now=T0 + 60, explain=True)
    assert result.assigned == 2
    assert wl.study("1.1").assignee == "dr-lan"
    assert wl.study("1.2").assignee == "dr-lan"
    # CT head needs neuro: dr-sok (KH licence) does not read neuro, so it waits, with why.
    assert wl.study("1.3").state == "ready"
    assert "no neuro subspecialty" in result.waiting["1.3"]
    assert "not licensed for KH-12" in result.waiting["1.3"]
    assert kinds(wl, "1.1") == ["received", "ready", "assigned"]
    assigned = wl.history("1.1")[-1]
    reasons = " | ".join(assigned.detail["reasons"])
    assert "licensed VN" in reasons and "reads CT-neuro" in reasons and "slack" in reasons
    (a,) = wl.assignments("1.1")
    assert a.radiologist == "dr-lan" and a.mode == "push" and a.ended_at is None
    # Lease: STAT 5 min from the assignment.
    assert wl.study("1.1").lease_expires_at == pytest.approx(T0 + 60 + 5 * 60)


def test_reading_flow_and_loud_failures(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram"))
    wl.upsert_radiologist(reader("dr-lan"))
    wl.upsert_radiologist(reader("dr-minh"))
    announce_studies(wl.engine, [NewStudy("2.1", "tram", "CR", "CHEST", 1)], at=T0)
    wl.consume_events(now=T0)
    wl.run_round(now=T0)
    who = wl.study("2.1").assignee
    other = "dr-minh" if who == "dr-lan" else "dr-lan"
    assert who is not None
    with pytest.raises(StaleState, match="expected assigned held by"):
        wl.open_study("2.1", other, now=T0 + 10)
    wl.open_study("2.1", who, now=T0 + 10)
    wl.open_study("2.1", who, now=T0 + 20)  # re-opening renews, no second transition
    until = wl.heartbeat("2.1", who, now=T0 + 100)
    assert until == pytest.approx(T0 + 100 + 15 * 60)
    with pytest.raises(StaleState):
        wl.heartbeat("2.1", other, now=T0 + 100)
    wl.submit_preliminary("2.1", who, now=T0 + 200)
    with pytest.raises(StaleState, match="is preliminary"):
        wl.submit_preliminary("2.1", who, now=T0 + 210)
    wl.finalize("2.1", who, now=T0 + 300)
    with pytest.raises(StaleState, match="is final"):
        wl.finalize("2.1", who, now=T0 + 310)
    assert kinds(wl, "2.1") == [
        "received",
        "ready",
        "assigned",
        "started",
        "preliminary",
        "final",
    ]
    st = wl.study("2.1")
    assert st.state == "final" and st.reported_at == pytest.approx(T0 + 200)
    (a,) = wl.assignments("2.1")
    assert a.end_reason == "preliminary" and a.started_at == pytest.approx(T0 + 10)


def test_history_is_append_only(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram"))
    announce_studies(wl.engine, [NewStudy("3.1", "tram")], at=T0)
    wl.consume_events(now=T0)
    for sql in ("UPDATE worklist_events SET kind = 'x'", "DELETE FROM worklist_events"):
        with pytest.raises(DBAPIError, match="append-only"), wl.engine.begin() as conn:
            conn.execute(text(sql))
    assert kinds(wl, "3.1") == ["received", "ready"]


def test_lease_expiry_returns_study_and_another_reader_gets_it(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram"))
    wl.upsert_radiologist(reader("dr-a", rvu_per_hour=20.0))
    wl.upsert_radiologist(reader("dr-b"))
    announce_studies(wl.engine, [NewStudy("4.1", "tram", "CT", "CHEST", 0)], at=T0)
    wl.consume_events(now=T0)
    wl.run_round(now=T0)
    first = wl.study("4.1").assignee
    assert first == "dr-a"  # fastest reader: least projected minutes
    # Nobody opened it within the STAT lease (5 min): back to the pool, then to dr-b.
    result = wl.run_round(now=T0 + 5 * 60 + 1)
    assert (result.released, result.assigned) == (1, 1)
    assert wl.study("4.1").assignee == "dr-b"
    history = wl.history("4.1")
    released = next(e for e in history if e.kind == "released")
    assert "lease expired" in released.detail["reasons"][0]
    ends = [a.end_reason for a in wl.assignments("4.1")]
    assert ends == ["lease_expired", ""]


def test_shift_end_and_capacity_change_release_unopened_studies(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram"))
    # dr-day works 07:00-15:00 local; dr-eve 14:00-23:00.
    wl.upsert_radiologist(
        reader("dr-day", shifts=[ShiftSpec.parse("mon-fri 07:00-15:00")], rvu_per_hour=30.0)
    )
    wl.upsert_radiologist(reader("dr-eve", shifts=[ShiftSpec.parse("mon-fri 14:00-23:00")]))
    t = T0 + 5 * 3600 + 40 * 60  # 14:40 local
    announce_studies(
        wl.engine, [NewStudy(f"5.{i}", "tram", "CR", "CHEST", 2) for i in range(3)], at=t
    )
    wl.consume_events(now=t)
    wl.run_round(now=t)
    held = {uid: wl.study(uid).assignee for uid in ("5.0", "5.1", "5.2")}
    assert list(held.values()).count("dr-day") >= 2
    day_uids = sorted(u for u, who in held.items() if who == "dr-day")
    wl.open_study(day_uids[0], "dr-day", now=t + 60)
    for uid in day_uids:
        wl.heartbeat(uid, "dr-day", now=t + 19 * 60)
    # 15:01: dr-day is off; the study they opened stays with them, the others move.
    result = wl.run_round(now=t + 21 * 60)
    assert wl.study(day_uids[0]).assignee == "dr-day"
    for uid in day_uids[1:]:
        assert wl.study(uid).assignee == "dr-eve"
        assert any(
            "shift ended" in " ".join(e.detail.get("reasons", []))
            for e in wl.history(uid)
            if e.kind == "released"
        )
    assert result.released == len(day_uids) - 1
    # Capacity change: dr-eve now takes only one study at a time.
    wl.upsert_radiologist(
        reader("dr-eve", shifts=[ShiftSpec.parse("mon-fri 14:00-23:00")], max_concurrent=1)
    )
    eve_before = [u for u in held if wl.study(u).assignee == "dr-eve"]
    result = wl.run_round(now=t + 22 * 60)
    eve_after = [u for u in held if wl.study(u).assignee == "dr-eve"]
    assert len(eve_after) <= 1
    assert result.released == max(0, len(eve_before) - 1)


def test_deactivated_reader_loses_unopened_studies(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram"))
    wl.upsert_radiologist(reader("dr-a"))
    announce_studies(wl.engine, [NewStudy("6.1", "tram")], at=T0)
    wl.consume_events(now=T0)
    wl.run_round(now=T0)
    assert wl.study("6.1").assignee == "dr-a"
    wl.set_radiologist_active("dr-a", False)
    result = wl.run_round(now=T0 + 60, explain=True)
    assert result.released == 1
    assert wl.study("6.1").state == "ready"
    assert "inactive" in result.waiting["6.1"]


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    fail_first = True

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if _Hook.fail_first:
            _Hook.fail_first = False
            self.send_response(500)
            self.end_headers()
            return
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    _Hook.received = []
    _Hook.fail_first = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/escalations"
    server.shutdown()


def test_escalation_event_and_webhook_with_retry(db_url: str, webhook: str) -> None:
    wl = make_worklist(db_url, webhook_urls=[webhook])
    wl.configure_station(station("tram"))
    announce_studies(wl.engine, [NewStudy("7.1", "tram", "CT", "CHEST", 0)], at=T0)
    wl.consume_events(now=T0)
    assert wl.run_round(now=T0 + 60).escalated == 0
    # No radiologist at all; 10 min before the STAT deadline it is escalated, once.
    assert wl.run_round(now=T0 + 20 * 60).escalated == 1
    assert wl.run_round(now=T0 + 21 * 60).escalated == 0
    assert wl.deliver_webhooks(now=T0 + 20 * 60) == 0  # the receiver answers 500 first
    assert wl.deliver_webhooks(now=T0 + 20 * 60 + 5) == 0  # backing off: not due yet
    assert wl.deliver_webhooks(now=T0 + 20 * 60 + 11) == 1
    (payload,) = _Hook.received
    assert payload["event"] == "study.escalated"
    assert payload["study_uid"] == "7.1" and payload["priority"] == "stat"
    assert payload["minutes_left"] == pytest.approx(10.0)
    assert "unassigned" in payload["reasons"][0]
    assert "PatientName" not in json.dumps(payload)
    assert wl.deliver_webhooks(now=T0 + 3600) == 0  # delivered exactly once
    assert kinds(wl, "7.1").count("escalated") == 1


def trauma_stat_for_a_full_reader(wl: Worklist, prefix: str, xray: Priority) -> None:
    """dr-fast (12 RVU/h, 2 at once) holds ``{prefix}.1``, a routine CT abdomen opened at
    T0 + 60 (~9 min in hand), and ``{prefix}.2``, a chest X-ray of priority ``xray`` not
    opened; dr-slow (6 RVU/h) has just come on; ``{prefix}.3``, a whole-body trauma CT from
    a 20-min STAT contract, arrives at T0 + 120 and waits for the next round."""
    wl.configure_station(station("tram"))
    wl.configure_station(station("trauma", sla_minutes={"stat": 20}))
    wl.upsert_radiologist(reader("dr-fast", rvu_per_hour=12.0, max_concurrent=2))
    announce_studies(
        wl.engine,
        [
            NewStudy(f"{prefix}.1", "tram", "CT", "ABDOMEN", Priority.ROUTINE),
            NewStudy(f"{prefix}.2", "tram", "CR", "CHEST", xray),
        ],
        at=T0,
    )
    wl.consume_events(now=T0)
    wl.run_round(now=T0)
    assert {wl.study(f"{prefix}.{i}").assignee for i in (1, 2)} == {"dr-fast"}
    wl.open_study(f"{prefix}.1", "dr-fast", now=T0 + 60)
    wl.upsert_radiologist(reader("dr-slow", rvu_per_hour=6.0))
    stat = NewStudy(f"{prefix}.3", "trauma", "CT", "WHOLEBODY", Priority.STAT)
    announce_studies(wl.engine, [stat], at=T0 + 120)
    wl.consume_events(now=T0 + 120)


def test_every_stat_handed_to_a_reader_is_posted(db_url: str, webhook: str) -> None:
    _Hook.fail_first = False
    wl = make_worklist(db_url, stat_webhook_urls=[webhook])
    trauma_stat_for_a_full_reader(wl, "10", Priority.URGENT)
    assert wl.deliver_webhooks(now=T0 + 120) == 0  # nothing STAT so far
    wl.run_round(now=T0 + 120)
    assert wl.deliver_webhooks(now=T0 + 120) == 1
    (paged,) = _Hook.received
    event_id = max(e.id for e in wl.history("10.3") if e.kind == "assigned")
    assert paged == {
        "event": "study.stat_assigned",
        "event_id": event_id,
        "study_uid": "10.3",
        "station": "trauma",
        "modality": "CT",
        "priority": "stat",
        "deadline": pytest.approx(T0 + 120 + 20 * 60),
        "minutes_left": 20.0,
        "radiologist": "dr-fast",
        "set_aside": True,
        "reasons": wl.history("10.3")[-1].detail["reasons"],
    }
    # an admin handing it over is posted too (set_aside unknown: false); a claim is not
    wl.reassign("10.3", "dr-slow", actor="admin-an", now=T0 + 180)
    assert wl.deliver_webhooks(now=T0 + 180) == 1
    assert _Hook.received[-1]["radiologist"] == "dr-slow"
    assert _Hook.received[-1]["set_aside"] is False
    assert _Hook.received[-1]["reasons"] == ["manual by admin-an"]
    assert "PatientName" not in json.dumps(_Hook.received)
    assert wl.deliver_webhooks(now=T0 + 3600) == 0  # each delivered once


def test_at_risk_study_is_moved_to_a_free_reader(db_url: str) -> None:
    wl = make_worklist(db_url, policy=QueuePolicy(max_backlog_minutes=120))
    wl.configure_station(station("tram"))
    wl.upsert_radiologist(reader("dr-busy", max_concurrent=6, rvu_per_hour=4.0))
    announce_studies(
        wl.engine,
        [NewStudy(f"8.{i}", "tram", "CT", "ABDOMEN", 1) for i in range(3)],
        at=T0,
    )
    wl.consume_events(now=T0)
    wl.run_round(now=T0)
    assert {wl.study(f"8.{i}").assignee for i in range(3)} == {"dr-busy"}
    for i in range(3):
        wl.heartbeat(f"8.{i}", "dr-busy", now=T0 + 3 * 3600 + 5 * 60)
    # 1.75 RVU each at 4 RVU/h: ~79 min of work queued. With 50 min left, a new free
    # reader takes what dr-busy would finish late.
    wl.upsert_radiologist(reader("dr-free", rvu_per_hour=10.0))
    now = T0 + 3 * 3600 + 10 * 60
    result = wl.run_round(now=now)
    assert result.reassigned >= 1
    moved = [e for i in range(3) for e in wl.history(f"8.{i}") if e.kind == "reassigned"]
    assert moved and all(e.radiologist == "dr-free" for e in moved)
    assert "would finish" in moved[0].detail["reasons"][0]
    assert moved[0].detail["previous"] == "dr-busy"


def test_stat_makes_room_on_the_quickest_reader_who_sets_their_case_aside(db_url: str) -> None:
    wl = make_worklist(db_url)
    trauma_stat_for_a_full_reader(wl, "9", Priority.ROUTINE)
    wl.run_round(now=T0 + 120)
    # dr-fast is full; after the CT in hand the trauma CT would be done in 20 min (deadline
    # 20 min): they set the CT aside and read it in 12.5 min; dr-slow would need 25. The
    # unopened chest X-ray moves to dr-slow to make room.
    stat, cxr, ct = wl.study("9.3"), wl.study("9.2"), wl.study("9.1")
    assert (stat.state, stat.assignee) == ("assigned", "dr-fast")
    assert (cxr.state, cxr.assignee) == ("assigned", "dr-slow")
    assert (ct.state, ct.assignee) == ("in_progress", "dr-fast")
    moved = wl.history("9.2")[-1]
    assert moved.kind == "reassigned" and moved.detail["previous"] == "dr-fast"
    assert moved.detail["reasons"][0] == "moved: makes room on dr-fast for STAT 9.3"
    why = wl.history("9.3")[-1].detail["reasons"]
    assert why[1].startswith("chosen: earliest finish (12 min of work")
    assert why[1].endswith("; they set the case in hand aside for it")


def test_pull_mode_claims(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram-hn"))
    wl.configure_station(station("tram-kh", jurisdiction="KH-12", language="km"))
    wl.upsert_radiologist(reader("dr-lan", max_concurrent=2))
    announce_studies(
        wl.engine,
        [
            NewStudy("9.1", "tram-kh", "CR", "CHEST", 0),  # not licensed: never for dr-lan
            NewStudy("9.2", "tram-hn", "CR", "CHEST", 2),
            NewStudy("9.3", "tram-hn", "CT", "HEAD", 1),
            NewStudy("9.4", "tram-hn", "CR", "CHEST", 2),
        ],
        at=T0,
    )
    wl.consume_events(now=T0)
    first = wl.claim_next("dr-lan", now=T0 + 60)
    second = wl.claim_next("dr-lan", now=T0 + 61)
    assert first is not None and second is not None
    assert (first.study_uid, second.study_uid) == ("9.3", "9.2")  # urgency order
    assert wl.claim_next("dr-lan", now=T0 + 62) is None  # at capacity
    assert wl.study("9.1").state == "ready"
    assert wl.assignments("9.3")[0].mode == "pull"
    # Pull-mode rounds release and escalate but never assign.
    result = wl.run_round(now=T0 + 120, assign=False)
    assert result.assigned == 0


def test_pull_claim_pages_profile_changes_and_locked_studies(db_url: str) -> None:
    """The claim's edges: candidates the engine refuses fill whole pages (the station
    excludes the reader), a profile change is seen by the next claim, a study another
    transaction holds is skipped, an unknown reader is an error."""
    wl = make_worklist(db_url)
    wl.configure_station(station("tram-x", excluded=["dr-lan"]))
    wl.configure_station(station("tram-ok"))
    wl.upsert_radiologist(reader("dr-lan", max_concurrent=4))
    # 40 excluded studies with the earliest deadlines: 2.5 pages the engine must skip
    new = [NewStudy(f"12.{i:02d}", "tram-x", "CR", "CHEST", 0) for i in range(40)]
    new += [NewStudy(f"12.{i}", "tram-ok", "CR", "CHEST", 2) for i in (50, 51, 52)]
    new += [NewStudy("12.60", "tram-ok", "MR", "BRAIN", 0)]
    announce_studies(wl.engine, new, at=T0)
    wl.consume_events(now=T0)
    first = wl.claim_next("dr-lan", now=T0 + 60)
    assert first is not None and first.study_uid == "12.50"
    # MR is not in dr-lan's profile until the admin adds it: the next claim sees it
    wl.upsert_radiologist(reader("dr-lan", max_concurrent=4, modalities=["CR", "CT", "MR"]))
    mr = wl.claim_next("dr-lan", now=T0 + 61)
    assert mr is not None and mr.study_uid == "12.60"
    with pytest.raises(UnknownRadiologist):
        wl.claim_next("dr-nobody", now=T0 + 62)
    if wl.engine.dialect.name == "postgresql":
        # another transaction holds 12.51 (a claimer mid-claim): skipped, not waited for
        with wl.engine.connect() as other, other.begin():
            other.execute(text("SELECT 1 FROM studies WHERE study_uid = '12.51' FOR UPDATE"))
            got = wl.claim_next("dr-lan", now=T0 + 63)
            assert got is not None and got.study_uid == "12.52"
        assert wl.study("12.51").state == "ready"
        assert [a.study_uid for a in wl.assignments("12.52")] == ["12.52"]
        assert kinds(wl, "12.52") == ["received", "ready", "assigned"]
    assert all(wl.study(s.uid).state == "ready" for s in new[:40])


def test_admin_controls(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram", sla_minutes={"urgent": 90}))
    wl.upsert_radiologist(reader("dr-lan"))
    wl.upsert_radiologist(reader("dr-cr", modalities=["CR"], subspecialties=[]))
    announce_studies(
        wl.engine,
        [
            NewStudy("10.1", "tram", "CT", "HEAD", 2, instances=100),
            NewStudy("10.2", "tram", "CT", "HEAD", 2, instances=100),  # duplicate
            NewStudy("10.3", "tram", "CT", "HEAD", 2, instances=20),  # late series, new UID
        ],
        at=T0,
    )
    wl.consume_events(now=T0)
    with pytest.raises(NotEligible, match="does not read CT"):
        wl.reassign("10.1", "dr-cr", actor="admin-hoa", now=T0)
    wl.reassign("10.1", "dr-cr", actor="admin-hoa", force=True, now=T0)
    assert wl.study("10.1").assignee == "dr-cr"
    forced = wl.history("10.1")[-1]
    assert forced.actor == "admin:admin-hoa" and "forced although" in forced.detail["reasons"][1]
    wl.reassign("10.1", "dr-lan", actor="admin-hoa", now=T0 + 10)
    assert [a.end_reason for a in wl.assignments("10.1")] == ["reassigned", ""]

    deadline = wl.set_priority("10.1", Priority.URGENT, actor="admin-hoa", now=T0 + 20)
    assert deadline == pytest.approx(T0 + 90 * 60)  # the station's urgent SLA
    assert wl.study("10.1").priority == Priority.URGENT

    wl.cancel("10.2", actor="admin-hoa", reason="duplicate of 10.1", now=T0 + 30)
    assert wl.study("10.2").state == "cancelled"
    with pytest.raises(StaleState, match="cancelled"):
        wl.cancel("10.2", actor="admin-hoa", reason="again", now=T0 + 31)

    wl.merge("10.3", "10.1", actor="admin-hoa", now=T0 + 40)
    src, dst = wl.study("10.3"), wl.study("10.1")
    assert (src.state, src.merged_into) == ("cancelled", "10.1")
    assert dst.instance_count == 120 and dst.late_instances == 20  # dst already assigned
    late = wl.history("10.1")[-1]
    assert late.kind == "late_series" and late.detail["merged_from"] == "10.3"


def test_follow_up_upload_of_assigned_study_is_flagged(db_url: str) -> None:
    wl = make_worklist(db_url)
    wl.configure_station(station("tram"))
    wl.upsert_radiologist(reader("dr-lan"))
    announce_studies(wl.engine, [NewStudy("11.1", "tram", "CR", "CHEST", 2, instances=2)], at=T0)
    wl.consume_events(now=T0)
    wl.run_round(now=T0)
    # The gateway commits a follow-up (late series of the same study UID).
    with wl.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO study_events (study_uid, kind, payload, created_at) "
                "VALUES ('11.1', 'study_received', :p, :t)"
            ),
            {
                "p": json.dumps(
                    {"station": "tram", "priority": 2, "instance_count": 3, "new_instances": 1}
                ),
                "t": T0 + 600,
            },
        )
    assert wl.consume_events(now=T0 + 600) == 1
    st = wl.study("11.1")
    assert (st.state, st.instance_count, st.late_instances) == ("assigned", 3, 1)
    late = wl.history("11.1")[-1]
    assert late.kind == "late_series" and late.detail["addendum_needed"] is False


def test_patient_identity_is_stored_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pydicom import Dataset

    ds = Dataset()
    ds.PatientName = "Nguyễn^Thị Lan"
    ds.PatientID = "VN-123456"
    ds.AccessionNumber = "ACC-77"
    ds.StudyDescription = "CT SO NAO"
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    wl = make_worklist(url, header_reader=lambda uid: ds)
    wl.configure_station(station("tram"))
    wl.upsert_radiologist(reader("dr-lan"))
    caplog.set_level("DEBUG")
    announce_studies(wl.engine, [NewStudy("12.1", "tram", "CT", "HEAD", 0)], at=T0)
    wl.consume_events(now=T0)
    wl.run_round(now=T0)
    st = wl.study("12.1")
    assert (st.patient_id, st.accession) == ("VN-123456", "ACC-77")
    assert st.patient_name == "Nguyễn^Thị Lan"
    assert st.patient_key and "VN-123456" not in st.patient_key
    assert "VN-123456" not in caplog.text and "Nguy" not in caplog.text
    with sqlite3.connect(tmp_path / "hub.sqlite3") as conn:
        events = " ".join(r[0] for r in conn.execute("SELECT detail FROM worklist_events"))
    assert "VN-123456" not in events and "Lan" not in events


def test_sticky_reader_for_the_same_patient(tmp_path: Path) -> None:
    from pydicom import Dataset

    def header(uid: str) -> Dataset:
        ds = Dataset()
        ds.PatientID = "P-1" if uid in ("13.1", "13.2") else f"P-{uid}"
        return ds

    wl = make_worklist(f"sqlite:///{tmp_path / 'hub.sqlite3'}", header_reader=header)
    wl.configure_station(station("tram"))
    wl.upsert_radiologist(reader("dr-a", rvu_per_hour=6.0))
    wl.upsert_radiologist(reader("dr-b", rvu_per_hour=12.0))
    announce_studies(wl.engine, [NewStudy("13.1", "tram", "CR", "CHEST", 2)], at=T0)
    wl.consume_events(now=T0)
    wl.reassign("13.1", "dr-a", actor="admin", now=T0)
    # Same patient's follow-up: dr-b is faster, but dr-a reads this patient.
    announce_studies(
        wl.engine,
        [NewStudy("13.2", "tram", "CR", "CHEST", 2), NewStudy("13.3", "tram", "CR", "CHEST", 2)],
        at=T0 + 60,
    )
    wl.consume_events(now=T0 + 60)
    wl.run_round(now=T0 + 60)
    assert wl.study("13.2").assignee == "dr-a"
    assert wl.study("13.3").assignee == "dr-b"
    reasons = wl.history("13.2")[-1].detail["reasons"]
    assert any("sticky" in r for r in reasons)


def test_roster_file_seeds_an_empty_hub_once(tmp_path: Path) -> None:
    from reading_queue.intake.service import open_ingest
    from reading_queue.settings import HubSettings
    from reading_queue.worklist.worker import open_worklist

    roster = tmp_path / "roster.yaml"
    roster.write_text(
        "radiologists:\n"
        "  - key: dr.lan\n    modalities: [CT, CR]\n    licences: [VN]\n"
        "    shifts: ['mon-fri 07:00-15:00']\n"
        "stations:\n  - name: tram-1\n    jurisdiction: VN-HN\n    language: vi\n"
    )
    settings = HubSettings(data_dir=tmp_path / "hub", roster_file=roster)
    ingest = open_ingest(settings)
    wl = open_worklist(settings, ingest.engine, ingest.first_header)
    assert [r.key for r in wl.radiologists()] == ["dr.lan"]
    assert wl.station("tram-1").jurisdiction == "VN-HN"
    # An admin change survives the next start: the seed is not applied again.
    wl.set_radiologist_active("dr.lan", False)
    reopened = open_ingest(settings)
    again = open_worklist(settings, reopened.engine, reopened.first_header)
    assert again.radiologist("dr.lan").active is False
