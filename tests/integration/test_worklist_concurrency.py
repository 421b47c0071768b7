"""Concurrent workers against one worklist: no double assignment, no lost study, no reader
past capacity. Eight processes on a real PostgreSQL cluster (``FOR UPDATE SKIP LOCKED``
claims, locked push rounds) and four on SQLite (serialised writers), each mixing pull
claims, push rounds and reports, thousands of claims in all."""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from reading_queue.models import make_engine
from reading_queue.worklist.policy import QueuePolicy
from reading_queue.worklist.service import StaleState, Worklist
from tests.support.peers import PostgresCluster
from tests.support.worklist_data import announce_studies, reader, station, synthetic_load

HELD = ("assigned", "in_progress")
VALID = {
    ("", "received"),
    ("received", "ready"),
    ("ready", "assigned"),
    ("assigned", "assigned"),
    ("assigned", "in_progress"),
    ("assigned", "ready"),
    ("in_progress", "ready"),
    ("in_progress", "preliminary"),
    ("in_progress", "final"),
    ("preliminary", "final"),
}


POLICY = QueuePolicy(max_backlog_minutes=10_000)  # only the concurrent-study cap holds


def _worker(url: str, wid: int, ops: int, keys: list[str], out: Any) -> None:
    wl = Worklist(make_engine(url), POLICY)
    rng = random.Random(wid)
    stats: dict[str, Any] = defaultdict(int)
    assigned: list[tuple[str, str]] = []
    try:
        for _ in range(ops):
            key = rng.choice(keys)
            roll = rng.random()
            if roll < 0.7:
                d = wl.claim_next(key)
                if d is None:
                    stats["empty_claims"] += 1
                    continue
                stats["claims"] += 1
                assigned.append((d.study_uid, key))
                if rng.random() < 0.85:
                    try:
                        wl.open_study(d.study_uid, key)
                        wl.finalize(d.study_uid, key)
                        stats["reported"] += 1
                    except StaleState:
                        stats["stale_report"] += 1
            elif roll < 0.73:
                result = wl.run_round()
                stats["round_assigned"] += result.assigned
                stats["round_reassigned"] += result.reassigned
                assigned += [
                    (d.study_uid, d.radiologist or "")
                    for d in result.decisions
                    if d.kind.value == "assign"
                ]
            else:
                for st in wl.studies(states=list(HELD), radiologist=key)[:2]:
                    try:
                        wl.open_study(st.study_uid, key)
                        wl.finalize(st.study_uid, key)
                        stats["reported"] += 1
                    except StaleState:
                        stats["stale_report"] += 1  # another worker reported it first
    except Exception as exc:  # any other failure is a bug: report it to the test
        stats["error"] = f"{type(exc).__name__}: {exc}"
    stats["assigned"] = assigned
    out.put(dict(stats))


def _run(url: str, workers: int, ops: int, n_studies: int) -> None:
    engine = make_engine(url)  # schema once, before the workers start
    wl = Worklist(engine, POLICY)
    readers, stations, studies = synthetic_load(n_studies, 16, seed=3)
    readers = [
        reader(r.key, **{**r.model_dump(exclude={"key"}), "max_concurrent": 3}) for r in readers
    ]
    for r in readers:
        wl.upsert_radiologist(r)
    for s in stations:
        wl.configure_station(s)
    wl.configure_station(station("spare"))
    announce_studies(engine, studies, at=time.time())
    while wl.consume_events():
        pass
    caps = {r.key: r.max_concurrent for r in readers}

    over: list[str] = []
    stop = threading.Event()

    def monitor() -> None:  # consistent snapshots while the workers run
        while not stop.is_set():
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT assignee, count(*) FROM studies "
                        "WHERE state IN ('assigned', 'in_progress') GROUP BY assignee"
                    )
                ).all()
            over.extend(f"{who} holds {n} > {caps[who]}" for who, n in rows if n > caps[who])
            time.sleep(0.05)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, i, ops, list(caps), q)) for i in range(workers)]
    for p in procs:
        p.start()
    results = [q.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    stop.set()
    watcher.join()

    errors = [r["error"] for r in results if "error" in r]
    assert errors == [], errors
    assert over == []
    claims = sum(r.get("claims", 0) for r in results)
    pushed = sum(r.get("round_assigned", 0) for r in results)
    reassigned = sum(r.get("round_reassigned", 0) for r in results)
    # The workers really competed for work: thousands of claims and assignments.
    assert claims + pushed >= workers * ops * 0.5, results
    print(f"{workers} workers: {claims} claims, {pushed} pushed, {reassigned} reassigned")
    told = [pair for r in results for pair in r["assigned"]]
    assert len(told) == len(set(told))  # nobody was told twice about the same assignment

    with engine.connect() as conn:
        n_assignments = conn.execute(text("SELECT count(*) FROM assignments")).scalar_one()
        # Every assignment a worker was told about is a row, and there are no others.
        assert n_assignments == claims + pushed + reassigned
        # No lost study, and the open assignment agrees with the study row.
        rows = conn.execute(text("SELECT study_uid, state, assignee FROM studies")).all()
        assert len(rows) == n_studies
        open_rows = conn.execute(
            text("SELECT study_uid, radiologist FROM assignments WHERE ended_at IS NULL")
        ).all()
        open_by_study = defaultdict(list)
        for uid, who in open_rows:
            open_by_study[uid].append(who)
        for uid, state, assignee in rows:
            if state in HELD:
                assert open_by_study[uid] == [assignee], uid
            else:
                assert open_by_study[uid] == [], uid
        # Holding periods of one study never overlap (no double assignment in time).
        spans = conn.execute(
            text(
                "SELECT study_uid, assigned_at, ended_at FROM assignments "
                "ORDER BY study_uid, assigned_at, id"
            )
        ).all()
        last: dict[str, float | None] = {}
        for uid, start, end in spans:
            if uid in last:
                prev_end = last[uid]
                assert prev_end is not None and prev_end <= start, uid
            last[uid] = end
        # Replaying each study's events reproduces its state: every transition was legal.
        state_of = {uid: "" for uid, _, _ in rows}
        for uid, kind, frm, to in conn.execute(
            text("SELECT study_uid, kind, from_state, to_state FROM worklist_events ORDER BY id")
        ):
            if kind in ("escalated", "late_series", "priority_changed"):
                continue
            assert state_of[uid] == frm, (uid, kind, state_of[uid], frm)
            assert (frm, to) in VALID, (uid, kind, frm, to)
            state_of[uid] = to
        assert state_of == {uid: state for uid, state, _ in rows}
        reported = conn.execute(
            text("SELECT count(*) FROM studies WHERE state = 'final'")
        ).scalar_one()
        assert reported == sum(r.get("reported", 0) for r in results)


@pytest.mark.slow
@pytest.mark.needs_postgres
def test_eight_workers_on_postgresql() -> None:
    with PostgresCluster() as pg:
        _run(pg.create_database("telerad_conc"), workers=8, ops=600, n_studies=5000)


@pytest.mark.slow
def test_four_workers_on_sqlite(tmp_path: Path) -> None:
    _run(f"sqlite:///{tmp_path / 'hub.sqlite3'}", workers=4, ops=200, n_studies=1200)
