"""The audit trail (reading_queue.audit): record() only queues, the writer batches, the table
refuses UPDATE and DELETE itself, pages by cursor, and a clean stop loses nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError

from reading_queue.accounts import Principal
from reading_queue.audit import (
    INSTANCES_ACCESSED,
    QUERY,
    USER_AUTHENTICATION,
    AuditTrail,
    Outcome,
    query_events,
)
from reading_queue.models import make_engine

LAN = Principal(1, "lan", "radiologist", "dr.lan", None)
UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite3'}")
    yield engine
    engine.dispose()


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one())


def _eventually(predicate: Callable[[], bool], deadline_s: float = 10.0) -> bool:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _statements(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn: object, _cur: object, statement: str, *_: object) -> None:
        seen.append(statement)

    return seen


def test_record_only_queues_and_flush_writes(engine: Engine) -> None:
    trail = AuditTrail(engine, interval_s=3600)  # the writer never wakes by itself here
    seen = _statements(engine)
    for n in range(3):
        trail.record(LAN, "", "frame.read", INSTANCES_ACCESSED, study_uid=UID, detail=f"#{n}")
    assert seen == [] and trail.pending == 3  # no database work in record()
    assert trail.flush() == 3
    assert trail.pending == 0 and _count(engine) == 3
    assert sum("INSERT" in s for s in seen) == 1  # one batch
    rows = trail.query()
    assert [(r.username, r.role, r.action, r.action_code, r.outcome) for r in rows] == [
        ("lan", "radiologist", INSTANCES_ACCESSED, "R", 0)
    ] * 3
    assert [r.detail for r in rows] == ["#0", "#1", "#2"]
    trail.close()


def test_the_writer_flushes_on_its_own(engine: Engine) -> None:
    trail = AuditTrail(engine, interval_s=0.05)
    trail.record("nobody", "", "auth.login", USER_AUTHENTICATION, outcome=Outcome.MINOR_FAILURE)
    assert _eventually(lambda: _count(engine) == 1)
    trail.close()


def test_a_full_batch_wakes_the_writer(engine: Engine) -> None:
    trail = AuditTrail(engine, interval_s=3600, batch_size=10)
    for _ in range(10):
        trail.record(LAN, "", "study.read", INSTANCES_ACCESSED, study_uid=UID)
    assert _eventually(lambda: _count(engine) == 10)  # long before the hour is up
    trail.close()


def test_the_database_refuses_update_and_delete(engine: Engine) -> None:
    trail = AuditTrail(engine)
    trail.record(LAN, "", "study.read", INSTANCES_ACCESSED, study_uid=UID)
    trail.close()
    for sql in ("UPDATE audit_events SET username = 'someone'", "DELETE FROM audit_events"):
        with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(text(sql))
    assert [r.username for r in query_events(engine)] == ["lan"]


def test_order_filters_and_cursor_pages(engine: Engine) -> None:
    now = [1000.0]
    trail = AuditTrail(engine, interval_s=3600, clock=lambda: now[0])
    for n in range(25):
        now[0] = 1000.0 + n
        who = LAN if n % 2 else "admin"
        trail.record(who, "admin" if n % 2 == 0 else "", "study.read", INSTANCES_ACCESSED,
                     study_uid=f"1.2.{n % 3}", outcome=8 if n == 7 else 0)  # fmt: skip
    trail.flush()
    seen: list[int] = []
    after: int | None = None
    while True:
        page = trail.query(limit=10, after_id=after)
        seen.extend(r.id for r in page)
        if len(page) < 10:
            break
        after = page[-1].id
    assert len(seen) == 25 and seen == sorted(seen)
    assert [r.at for r in trail.query(limit=25)] == [1000.0 + n for n in range(25)]
    assert len(trail.query(username="lan")) == 12
    assert {r.role for r in trail.query(username="admin")} == {"admin"}
    assert len(trail.query(study_uid="1.2.0")) == 9
    assert [r.at for r in trail.query(since=1010.0, until=1013.0)] == [1010.0, 1011.0, 1012.0]
    assert [r.at for r in trail.query(outcome=8)] == [1007.0]
    assert trail.query(event_type="auth.login") == []
    with pytest.raises(ValueError, match="limit"):
        trail.query(limit=0)
    trail.close()


def test_record_reads_is_one_row_per_study(engine: Engine) -> None:
    trail = AuditTrail(engine)
    trail.record_reads(LAN, ["1.2.1", "1.2.2", "1.2.3"], address="10.0.0.9")
    trail.close()
    rows = query_events(engine)
    assert [(r.study_uid, r.action, r.event_type, r.address) for r in rows] == [
        (uid, QUERY, "study.search", "10.0.0.9") for uid in ("1.2.1", "1.2.2", "1.2.3")
    ]


def test_values_outside_the_dicom_vocabulary_are_refused(engine: Engine) -> None:
    trail = AuditTrail(engine)
    with pytest.raises(ValueError, match="0, 4, 8 or 12"):
        trail.record(LAN, "", "study.read", INSTANCES_ACCESSED, outcome=1)
    with pytest.raises(ValueError, match="C R U D E"):
        trail.record(LAN, "", "study.read", INSTANCES_ACCESSED, action_code="X")
    with pytest.raises(ValueError, match="action_code"):
        trail.record(LAN, "", "x.y", "Something Else")
    trail.record(LAN, "", "x.y", "Something Else", action_code="U")
    trail.close()
    assert trail.pending == 0 and _count(engine) == 1


def test_no_event_lost_on_close_under_concurrent_record(engine: Engine) -> None:
    trail = AuditTrail(engine, interval_s=0.01, batch_size=50)
    threads, per_thread = 6, 400
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        start.wait()
        for n in range(per_thread):
            trail.record(f"user{t}", "radiologist", "frame.read", INSTANCES_ACCESSED,
                         study_uid=UID, detail=str(n))  # fmt: skip

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    for w in workers[: threads // 2]:
        w.join()
    trail.close()  # while half the threads still record: those after it are written at once
    for w in workers[threads // 2 :]:
        w.join()
    assert trail.pending == 0
    assert _count(engine) == threads * per_thread
    for t in range(threads):  # each thread's events in the order it recorded them
        details = [r.detail for r in query_events(engine, username=f"user{t}", limit=per_thread)]
        assert details == [str(n) for n in range(per_thread)]


def test_a_failed_write_keeps_the_events(engine: Engine) -> None:
    trail = AuditTrail(engine, interval_s=3600)
    trail.record(LAN, "", "study.read", INSTANCES_ACCESSED)
    trail.record(LAN, "", "frame.read", INSTANCES_ACCESSED)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
    with pytest.raises(DatabaseError):
        trail.flush()
    assert trail.pending == 2
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events_away RENAME TO audit_events"))
    trail.close()
    assert [r.event_type for r in query_events(engine)] == ["study.read", "frame.read"]
