"""Worklist simulation benchmark: telerad's engine against FIFO pull and round-robin push.

Question: on the same arrivals and the same roster, does assigning with the engine keep the
SLAs better than what sites do today? A simulated Monday (2026-11-23, Asia/Ho_Chi_Minh):
150 stations in Vietnam and Cambodia, Poisson arrivals with a morning peak, 70 % CR / 30 %
CT, 10 % STAT, 15 % URGENT, and the 12 radiologists of deploy/roster.example.yaml in shifts
with their licence, subspecialty and language limits. The three strategies get the same
arrivals and the same reading-time draw per study (see reading_queue/simulator.py).

Rows compared (lower is better): STAT and URGENT turnaround p50/p95, SLA breaches per class,
the longest ROUTINE wait and the workload Gini. Targets for telerad: zero STAT breaches at
<= 85 % utilisation, STAT p95 <= 30 min, no worse than FIFO and round robin on every row.

    python -m benchmarks.worklist_sim [--json OUT] [--plot PNG] [--seed N] [--seeds N]
                                      [--roster FILE] [--arrivals FILE]

``--roster``/``--arrivals`` replay your own files (the format is in
docs/worklist-simulation.md); without ``--arrivals`` the synthetic day is used. ``--seeds N``
also runs N synthetic days (seeds N..N+k) and prints one line per day, because one day is
one draw. A full comparison takes a few seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from reading_queue import QueueError
from reading_queue.simulator import (
    PEAK_TZ,
    STUDIES_PER_STATION,
    Arrival,
    Report,
    compare,
    load_arrivals,
    synthetic_day,
)
from reading_queue.worklist.policy import QueuePolicy
from reading_queue.worklist.roster import Roster, load_roster

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROSTER = _REPO / "deploy" / "roster.example.yaml"
DEFAULT_DAY = "2026-11-23"  # a Monday


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What a reader needs to compare wall times between machines (the results don't vary)."""
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.worklist_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="plot turnaround ECDFs")
    parser.add_argument("--seed", type=int, default=1, help="synthetic day and reading times")
    parser.add_argument(
        "--seeds", type=int, default=0, metavar="N", help="also run N synthetic days, one line each"
    )
    parser.add_argument(
        "--roster",
        type=Path,
        default=DEFAULT_ROSTER,
        help="roster YAML/TOML (default deploy/roster.example.yaml)",
    )
    parser.add_argument("--arrivals", type=Path, help="arrivals CSV instead of the synthetic day")
    parser.add_argument(
        "--date", default=DEFAULT_DAY, help=f"synthetic day, local date in {PEAK_TZ}"
    )
    parser.add_argument(
        "--stations", type=int, default=150, help="synthetic day: stations (default 150)"
    )
    parser.add_argument(
        "--studies-per-station",
        type=float,
        default=STUDIES_PER_STATION,
        help=f"synthetic day: mean studies per station and day (default {STUDIES_PER_STATION:g})",
    )
    return parser.parse_args(argv)


def day_start(date: str) -> _dt.datetime:
    day = _dt.date.fromisoformat(date)
    return _dt.datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(PEAK_TZ))


def synthetic(roster: Roster, args: argparse.Namespace, seed: int) -> list[Arrival]:
    return synthetic_day(
        roster,
        seed=seed,
        start=day_start(args.date),
        stations=args.stations,
        studies_per_station=args.studies_per_station,
    )


def sweep_line(seed: int, report: Report) -> str:
    t = report.results["telerad"]
    stat = t.classes["stat"]
    others = [r for k, r in report.results.items() if k != "telerad"]
    lost = [r["metric"] for r in report.rows() if r["telerad_best"] is False]
    p95 = "unread" if stat.p95_min is None else f"{stat.p95_min:.1f}"
    return (
        f"{seed:>5}{report.arrivals['count']:>7}{100 * t.utilisation:>7.1f}%"
        f"{stat.breaches:>6}/{stat.count:<4}"
        + "".join(f"{o.classes['stat'].breaches:>8}" for o in others)
        + f"{p95:>10}   "
        + (", ".join(lost) if lost else "-")
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    info = machine()
    policy = QueuePolicy()
    try:
        roster = load_roster(args.roster)
        if args.arrivals is not None:
            arrivals = load_arrivals(args.arrivals, roster)
            source = str(args.arrivals)
        else:
            arrivals = synthetic(roster, args, args.seed)
            source = (
                f"synthetic day {args.date} ({PEAK_TZ}), {args.stations} stations,"
                f" {args.studies_per_station:g} studies/station/day, seed {args.seed}"
            )
        log(f"{len(arrivals)} arrivals ({source}); simulating 3 strategies")
        report = compare(roster, arrivals, policy, args.seed, progress=lambda s: log(f"  {s}"))
        sweep: list[tuple[int, Report]] = []
        if args.seeds > 0 and args.arrivals is None:
            for seed in range(args.seed, args.seed + args.seeds):
                log(f"sweep: seed {seed}")
                sweep.append((seed, compare(roster, synthetic(roster, args, seed), policy, seed)))
    except (QueueError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started

    print(f"Worklist simulation: {source}")
    print(
        f"roster {args.roster} ({len(roster.radiologists)} radiologists,"
        f" {len(roster.stations)} stations)"
    )
    print(report.table())
    if sweep:
        names = [k for k in report.results if k != "telerad"]
        print()
        print(
            f"{len(sweep)} synthetic days: telerad's utilisation, STAT breaches (also FIFO's"
            " and RR's) and STAT p95"
        )
        short = {"fifo_pull": "FIFO", "round_robin": "RR"}
        print(
            f"{'seed':>5}{'count':>7}{'util':>8}{'STAT breaches':>15}"
            + "".join(f"{short.get(n, n)[:7]:>8}" for n in names)
            + f"{'p95 min':>10}   rows telerad lost"
        )
        for seed, rep in sweep:
            print(sweep_line(seed, rep))
        met = sum(all(rep.targets().values()) for _, rep in sweep)
        zero = sum(rep.targets()["zero_stat_breaches"] for _, rep in sweep)
        print(f"  all targets met on {met} of {len(sweep)} days; zero STAT breaches on {zero}")
    print(
        f"\n({elapsed:.1f} s on {info['host']}, {info['cpus']} CPUs, Python {info['python']},"
        f" load {info['load_1min']:g}, {info['date']})"
    )
    if args.json:
        out = report.to_json()
        out["machine"] = info | {"elapsed_s": round(elapsed, 2)}
        out["source"] = source
        if sweep:
            out["sweep"] = [
                {"seed": seed, "targets": rep.to_json()["targets"], "rows": rep.to_json()["rows"]}
                for seed, rep in sweep
            ]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
        log(f"results written to {args.json}")
    if args.plot:
        report.plot(args.plot)
        log(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
