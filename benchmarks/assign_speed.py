"""Assignment speed: decisions per second with 10,000 open studies and 100 radiologists.

Question: can the worklist keep up with a national network? Target: ≥ 1,000 assignment
decisions/s on SQLite (the embedded default) and on PostgreSQL (a cluster this script starts
from the installed binaries, fsync on).

Measured, on each database:

1. **push**: a push round over 10,000 open studies (the engine sees them all, with loads,
   stickiness and escalation) assigning every free slot of 100 readers; decisions/s =
   assignments (incl. escalations) made by rounds ÷ the rounds' wall time. Between rounds the
   readers' studies are reported (not timed) and new ones arrive, so 10,000 stay open.
2. **pull**: ``claim_next`` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), one claim per
   transaction, from 1, 2 and 4 processes at once (on a 2-core machine, 4 Python processes
   and their 4 database backends share 2 cores).
3. **peer**: the same number of claims as one bare SQL statement each, the minimal
   work-queue claim (``UPDATE ... WHERE study_uid = (SELECT ... ORDER BY deadline LIMIT 1
   [FOR UPDATE SKIP LOCKED]) RETURNING``): what the database alone costs per claim, with no
   eligibility, capacity, reasons, events or assignment rows. The ratio says what telerad's
   bookkeeping costs on top.

    python -m benchmarks.assign_speed [--json OUT] [--studies N] [--readers N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from reading_queue.models import make_engine
from reading_queue.worklist.policy import QueuePolicy
from reading_queue.worklist.service import Worklist
from tests.support.peers import PostgresCluster, postgres_bin_dir
from tests.support.worklist_data import NewStudy, announce_studies, reader, synthetic_load

TARGET = 1000.0
#: claiming processes at once (radiologists asking for work at the same moment)
CLAIMERS = (1, 2, 4)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _setup(url: str, n_studies: int, n_readers: int, capacity: int) -> tuple[Engine, Worklist]:
    engine = make_engine(url)
    wl = Worklist(engine)
    readers, stations, studies = synthetic_load(n_studies, n_readers, seed=11)
    for r in readers:
        wl.upsert_radiologist(
            reader(r.key, **{**r.model_dump(exclude={"key"}), "max_concurrent": capacity})
        )
    for s in stations:
        wl.configure_station(s)
    announce_studies(engine, studies, at=time.time())
    while wl.consume_events(limit=2000):
        pass
    # Planner statistics after the bulk load, as autovacuum (PostgreSQL) would gather them
    # within a minute; without them PostgreSQL sorts every ready study for each claim.
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    return engine, wl


def _report_all_held(engine: Engine) -> int:
    """Readers finish their studies (bookkeeping for the next round; not timed)."""
    with engine.begin() as conn:
        res = conn.execute(
            text(
                "UPDATE studies SET state = 'final', reported_at = :t "
                "WHERE state IN ('assigned', 'in_progress')"
            ),
            {"t": time.time()},
        )
        conn.execute(
            text(
                "UPDATE assignments SET ended_at = :t, end_reason = 'final' WHERE ended_at IS NULL"
            ),
            {"t": time.time()},
        )
        return int(res.rowcount or 0)


def bench_push(url: str, n_studies: int, n_readers: int, rounds: int) -> dict[str, Any]:
    engine, wl = _setup(url, n_studies, n_readers, capacity=4)
    decisions = 0
    spent = 0.0
    extra = 0
    open_counts = []
    for i in range(rounds):
        with engine.connect() as conn:
            ready = conn.execute(text("SELECT count(*) FROM studies WHERE state = 'ready'"))
            open_counts.append(int(ready.scalar_one()))
        t = time.perf_counter()
        result = wl.run_round()
        spent += time.perf_counter() - t
        decisions += result.assigned + result.reassigned + result.escalated + result.released
        done = _report_all_held(engine)
        # Keep the worklist at its size: as many new studies as were just reported.
        new = [
            NewStudy(f"2.25.99.{i}.{k}", f"vn-{k % 40:03d}", "CR", "CHEST", 2) for k in range(done)
        ]
        extra += len(new)
        announce_studies(engine, new, at=time.time())
        while wl.consume_events(limit=2000):
            pass
    engine.dispose()
    return {
        "rounds": rounds,
        "decisions": decisions,
        "seconds": spent,
        "per_s": decisions / spent if spent else 0.0,
        "open_studies_min": min(open_counts),
        "round_ms": spent / rounds * 1000.0,
    }


def _claimer(url: str, keys: list[str], n: int, ready: Any, go: Any, out: Any) -> None:
    # readers never fill up here: every claim is a decision, none is refused for capacity
    wl = Worklist(make_engine(url), QueuePolicy(max_backlog_minutes=1e9))
    ready.put(True)
    go.wait()
    got = 0
    t = time.monotonic()
    for i in range(n):
        if wl.claim_next(keys[i % len(keys)]) is not None:
            got += 1
    out.put((got, t, time.monotonic()))


def _bare_claimer(url: str, n: int, ready: Any, go: Any, out: Any) -> None:
    engine = make_engine(url)
    lock = " FOR UPDATE SKIP LOCKED" if engine.dialect.name == "postgresql" else ""
    sql = text(
        "UPDATE studies SET state = 'assigned', assignee = :who WHERE study_uid = ("
        f"SELECT study_uid FROM studies WHERE state = 'ready' ORDER BY deadline LIMIT 1{lock}"
        ") RETURNING study_uid"
    )
    ready.put(True)
    go.wait()
    got = 0
    t = time.monotonic()
    for _ in range(n):
        with engine.begin() as conn:
            if conn.execute(sql, {"who": "bare"}).first() is not None:
                got += 1
    out.put((got, t, time.monotonic()))


def _parallel(target: Any, args_for: list[tuple[Any, ...]]) -> tuple[int, float]:
    """Run ``target`` in one process per argument tuple, all starting together once every
    process has started up; returns the claims made and the seconds from the first claim to
    the last (time.monotonic is the same clock in every process)."""
    ctx = mp.get_context("spawn")
    ready, go, q = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, ready, go, q)) for a in args_for]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    go.set()
    results = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    span = max(r[2] for r in results) - min(r[1] for r in results)
    return sum(r[0] for r in results), span


def _replenish(engine: Engine, wl: Worklist, tag: str) -> int:
    """Between measurements (not timed): readers report what they claimed and as many new
    studies arrive, with the mix of the first ones, so every measurement starts with the
    same number of ready studies. Returns that number."""
    done = _report_all_held(engine)
    _, _, mix = synthetic_load(done, 1, seed=zlib.crc32(tag.encode()))
    new = [NewStudy(f"{s.uid}.{tag}", s.station, s.modality, s.body_part, s.priority) for s in mix]
    announce_studies(engine, new, at=time.time())
    while wl.consume_events(limit=2000):
        pass
    with engine.connect() as conn:
        return int(
            conn.execute(text("SELECT count(*) FROM studies WHERE state = 'ready'")).scalar_one()
        )


def bench_pull(url: str, n_studies: int, n_readers: int, claims: int) -> dict[str, Any]:
    engine, wl = _setup(url, n_studies, n_readers, capacity=100_000)
    keys = [r.key for r in wl.radiologists()]
    out: dict[str, Any] = {}
    for procs in CLAIMERS:
        ready = _replenish(engine, wl, f"t{procs}")
        got, secs = _parallel(
            _claimer, [(url, keys[i::procs], claims // procs) for i in range(procs)]
        )
        out[f"telerad_{procs}"] = {
            "claims": got,
            "seconds": secs,
            "per_s": got / secs,
            "ready_before": ready,
        }
        log(f"  pull x{procs}: {got} claims in {secs:.2f} s = {got / secs:.0f}/s ({ready} ready)")
    for procs in CLAIMERS:
        ready = _replenish(engine, wl, f"b{procs}")
        got, secs = _parallel(_bare_claimer, [(url, claims // procs) for _ in range(procs)])
        out[f"bare_sql_{procs}"] = {
            "claims": got,
            "seconds": secs,
            "per_s": got / secs,
            "ready_before": ready,
        }
        log(f"  bare SQL x{procs}: {got} claims in {secs:.2f} s = {got / secs:.0f}/s")
    engine.dispose()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} cores={mp.cpu_count()}",
        "studies": args.studies,
        "readers": args.readers,
        "databases": {},
    }
    with tempfile.TemporaryDirectory(prefix="telerad-assign-") as tmp:
        targets: list[tuple[str, Any]] = [("sqlite", None)]
        if postgres_bin_dir() is not None:
            targets.append(("postgresql", PostgresCluster(durable=True)))
        else:
            log("PostgreSQL binaries missing: SQLite only")
        for name, cluster in targets:
            if cluster is not None:
                cluster.start()
            try:

                def url_for(tag: str, name: str = name, cluster: Any = cluster) -> str:
                    if cluster is None:
                        return f"sqlite:///{Path(tmp) / f'{tag}.sqlite3'}"
                    return str(cluster.create_database(tag))

                log(f"{name}: push rounds over {args.studies} open studies")
                push = bench_push(url_for("push"), args.studies, args.readers, args.rounds)
                log(
                    f"  push: {push['decisions']} decisions in {push['seconds']:.2f} s "
                    f"= {push['per_s']:.0f}/s ({push['round_ms']:.0f} ms per round)"
                )
                log(f"{name}: pull claims")
                pull = bench_pull(url_for("pull"), args.studies, args.readers, args.claims)
                results["databases"][name] = {"push": push, "pull": pull}
            finally:
                if cluster is not None:
                    cluster.stop()
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        f"assignment speed, {results['studies']} open studies, {results['readers']} readers "
        f"({results['machine']})",
        f"{'database':<11} {'mode':<22} {'decisions/s':>12} {'vs bare SQL':>12} {'target':>8}",
    ]
    for db, r in results["databases"].items():
        push = r["push"]
        ok = "met" if push["per_s"] >= TARGET else "MISSED"
        lines.append(f"{db:<11} {'push round':<22} {push['per_s']:>12.0f} {'':>12} {ok:>8}")
        for procs in CLAIMERS:
            t = r["pull"][f"telerad_{procs}"]["per_s"]
            b = r["pull"][f"bare_sql_{procs}"]["per_s"]
            ok = "met" if t >= TARGET else "MISSED"
            mode = f"pull claim x{procs} proc"
            lines.append(f"{db:<11} {mode:<22} {t:>12.0f} {t / b:>11.2f}x {ok:>8}")
            lines.append(f"{'':<11} {'  bare SQL claim':<22} {b:>12.0f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=10_000)
    p.add_argument("--readers", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--claims", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="2,000 studies, 20 readers")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.studies, args.readers, args.rounds, args.claims = 2000, 20, 2, 400
    results = run(args)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
