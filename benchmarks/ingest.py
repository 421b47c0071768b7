"""Ingest: how fast does a modality's push become durable in the gateway, against real peers?

``python -m benchmarks.ingest [--rounds N] [--ct-slices N] [--json OUT]
[--breakdown] [--profile DIR]``

The demo set (a 512x512 CT of ``--ct-slices`` slices and a 2500x2048 chest CR, 73 MB at
120 slices) is pushed by DCMTK ``storescu`` in one association into

* ``gateway``  - ``telerad gateway serve`` as its own process, no hub URL (nothing forwards
  while it receives); every instance is written, fsynced, renamed, its directory fsynced and
  recorded in SQLite (docs/architecture.md, "Durability") before Success is answered;
* ``orthanc``  - the real Orthanc (fsyncs each file: ``SyncStorageArea`` defaults to true
  since 1.7.4; SQLite index);
* ``storescp`` - DCMTK ``storescp``, which writes files without fsync: the floor.

Every push gets fresh UIDs (``restamp`` with a new salt), so nobody measures de-duplication.
Targets alternate within the run (gateway, orthanc, storescp, gateway, ...) so drift of a
shared machine spreads over all of them; a warm-up round is not counted. Before each push
dirty pages are flushed (``sync``) so nobody pays for the previous writer. After each push the
target is asked what it stored; a count short of the push voids the run.

``--breakdown`` then runs the gateway's ``Listener`` in this process with a timer around each
step of the C-STORE path, next to the same pynetdicom AE answering without storing (the
floor). ``--profile DIR`` samples one more gateway push with py-spy (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pynetdicom import evt

from benchmarks._common import (
    MB,
    GatewayTarget,
    OrthancTarget,
    Pressure,
    PushFailed,
    StoreSCPTarget,
    StorescuProfile,
    Target,
    flush_page_cache_writes,
    gateway_stored,
    instance_ids,
    load_average,
    machine_info,
    print_table,
    sample_set,
    scratch_dir,
    sigterm_as_exit,
    storescu_push,
    total_bytes,
    write_json,
)
from sample_studies.generate import DEFAULT_CT_SLICES, restamp
from tests.support.peers import dcmtk_available, orthanc_available

# Targets from the issue: the gateway must keep up with Orthanc and with a gigabit link.
TARGET_VS_ORTHANC = 1.0
TARGET_MB_S = 110.0


def _push_once(
    target: Target,
    files: list[Path],
    profile: StorescuProfile,
    inbox: Path,
    salt: str,
) -> float:
    """Restamp, flush, push, verify; return the push's seconds."""
    pushed = restamp(files, inbox / salt, salt=salt)
    try:
        ids = instance_ids(pushed)
        if len(ids.sop_uids) != len(files):
            raise PushFailed(f"restamp gave {len(ids.sop_uids)} distinct UIDs for {len(files)}")
        flush_page_cache_writes()
        seconds = storescu_push(pushed, target.host, target.port, target.aet, profile)
        got = target.stored(ids)
        if got != len(ids.sop_uids):
            raise PushFailed(f"{target.name} holds {got} of {len(ids.sop_uids)} pushed instances")
    finally:
        shutil.rmtree(inbox / salt, ignore_errors=True)
    return seconds


def _summarise(name: str, seconds: list[float], instances: int, nbytes: int) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "target": name,
        "seconds": [round(s, 4) for s in seconds],
        "median_s": round(median, 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
        "instances_per_s": round(instances / median, 1),
        "mb_per_s": round(nbytes / MB / median, 1),
    }


# ---------------------------------------------------------------------------- --breakdown


class _PhaseTimer:
    """Wall time per phase, exclusive of nested phases; an *absorbing* phase keeps the time
    of everything it calls (``fsync_dir`` calls ``os.fsync`` too, but is its own phase)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._local = threading.local()

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, name: str, fn: Callable[..., Any], *, absorbing: bool = False) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack: list[list[Any]] = self._local.__dict__.setdefault("stack", [])
            if stack and stack[-1][2]:
                return fn(*args, **kwargs)  # inside an absorbing phase
            frame: list[Any] = [name, 0.0, absorbing]
            stack.append(frame)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                stack.pop()
                self.seconds[name] += elapsed - frame[1]
                self.calls[name] += 1
                if stack:
                    stack[-1][1] += elapsed

        return timed


class _Proxy:
    """A module stand-in whose selected functions are replaced, the rest passed through."""

    def __init__(self, module: Any, replaced: dict[str, Any]) -> None:
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _TimedHash:
    """A hashlib object whose ``update`` is charged to the sha256 phase."""

    def __init__(self, inner: Any, update: Callable[[Any, Any], None]) -> None:
        self._inner = inner
        self._update = update

    def update(self, data: Any) -> None:
        self._update(self._inner, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# (module[:class], attribute, phase label, absorbing). Old and new names of the same step
# share a label; missing attributes are skipped and reported, so a refactor of the C-STORE
# path degrades the breakdown instead of breaking it.
_SHA = "sha256"
_HEADER = "header parse (pydicom dcmread)"
_REST = "store: checks, records, rest"
_PHASES: list[tuple[str, str, str, bool]] = [
    (
        "dicom_gateway.durable.scp:Listener",
        "handle_store",
        "handle_store: file meta, metrics",
        False,
    ),
    ("pynetdicom.events:Event", "encoded_dataset", "pynetdicom encoded_dataset()", False),
    ("dicom_gateway.durable.scp", "write_file_meta_info", "pydicom write_file_meta_info", False),
    ("dicom_gateway.durable.scp:Listener", "store", _REST, False),
    ("dicom_gateway.durable.scp:Listener", "store_parts", _REST, False),
    ("dicom_gateway.durable.spool:Spool", "free_bytes", "disk reserve check (statvfs)", False),
    ("dicom_gateway.durable.scp", "_parse_header", _HEADER, False),
    ("dicom_gateway.durable.scp", "dcmread", _HEADER, False),
    ("dicom_gateway.durable.scp", "dataset_sha256", _SHA, False),
    ("dicom_gateway.durable.state:StateDB", "get_instance", "SQLite get_instance", False),
    ("dicom_gateway.durable.spool:Spool", "store", "spool.store: paths, rest", False),
    ("telerad.core.fileio", "ensure_dir", "ensure_dir (study folder)", True),
    ("telerad.core.fileio", "fsync_dir", "fsync(directory)", True),
    ("dicom_gateway.durable.scp", "evaluate_priority", "priority rules", False),
    (
        "dicom_gateway.durable.state:StateDB",
        "record_instance",
        "SQLite record_instance+COMMIT",
        False,
    ),
]


def _resolve(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    return getattr(obj, attr) if attr else obj


@contextmanager
def _instrumented(timer: _PhaseTimer) -> Iterator[list[str]]:
    """Wrap each phase of the C-STORE path with ``timer``; restore everything on exit."""
    undo: list[tuple[Any, str, Any]] = []
    skipped: list[str] = []

    def patch(owner: Any, attr: str, new: Any) -> None:
        undo.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, new)

    try:
        for spec, attr, label, absorbing in _PHASES:
            owner = _resolve(spec)
            if not hasattr(owner, attr):
                skipped.append(f"{spec}.{attr}")
                continue
            patch(owner, attr, timer.wrap(label, getattr(owner, attr), absorbing=absorbing))
        scp = importlib.import_module("dicom_gateway.durable.scp")
        if hasattr(scp, "hashlib"):
            real_sha = scp.hashlib.sha256
            update = timer.wrap(_SHA, lambda h, data: h.update(data))
            make = timer.wrap(_SHA, lambda *a, **k: _TimedHash(real_sha(*a, **k), update))
            patch(scp, "hashlib", _Proxy(scp.hashlib, {"sha256": make}))
        fileio = importlib.import_module("telerad.core.fileio")
        if hasattr(fileio, "os"):
            real = fileio.os
            write = "write() into page cache"
            patch(
                fileio,
                "os",
                _Proxy(
                    real,
                    {
                        "write": timer.wrap(write, real.write),
                        "writev": timer.wrap(write, real.writev),
                        "fsync": timer.wrap("fsync(file)", real.fsync),
                        "open": timer.wrap("open/close temp file", real.open),
                        "close": timer.wrap("open/close temp file", real.close),
                        "replace": timer.wrap("rename into place", real.replace),
                    },
                ),
            )
        yield skipped
    finally:
        for owner, attr, old in reversed(undo):
            setattr(owner, attr, old)


def _breakdown(
    files: list[Path], profile: StorescuProfile, root: Path, rounds: int, run_id: str
) -> dict[str, Any]:
    """Where the gateway's time goes: in-process Listener with phase timers, and the floor."""
    from dicom_gateway.durable.scp import Listener
    from dicom_gateway.durable.spool import Spool
    from dicom_gateway.durable.state import StateDB
    from dicom_gateway.station.settings import GatewaySettings

    data_dir = root / "breakdown"
    settings = GatewaySettings(
        data_dir=data_dir,
        aet="TELERAD_GW",
        dicom_host="127.0.0.1",
        dicom_port=0,
        disk_reserve_mb=1,
    )
    inbox = root / "inbox"
    timer = _PhaseTimer()
    walls: dict[str, list[float]] = {"floor": [], "gateway": []}

    # The floor: the gateway's own AE (same contexts, PDU size), answering without storing.
    floor_ae = Listener(settings, Spool(root / "floor"), StateDB(root / "floor" / "s.db"), [])
    server = floor_ae.build_ae().start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)]
    )
    assert server is not None
    try:
        for rnd in range(rounds + 1):
            salt = f"{run_id}-floor-{rnd}"
            pushed = restamp(files, inbox / salt, salt=salt)
            flush_page_cache_writes()
            secs = storescu_push(pushed, "127.0.0.1", server.server_address[1], "FLOOR", profile)
            shutil.rmtree(inbox / salt, ignore_errors=True)
            if rnd:
                walls["floor"].append(secs)
    finally:
        server.shutdown()
        floor_ae.state.close()

    state = StateDB(data_dir / "gateway.sqlite3")
    with _instrumented(timer) as skipped:
        listener = Listener(settings, Spool(data_dir), state, [])
        listener.start()
        try:
            for rnd in range(rounds + 1):
                salt = f"{run_id}-breakdown-{rnd}"
                pushed = restamp(files, inbox / salt, salt=salt)
                ids = instance_ids(pushed)
                flush_page_cache_writes()
                if rnd == 1:
                    timer.reset()  # round 0 warms up
                secs = storescu_push(pushed, "127.0.0.1", listener.port, "TELERAD_GW", profile)
                shutil.rmtree(inbox / salt, ignore_errors=True)
                got = gateway_stored(data_dir / "gateway.sqlite3", data_dir, ids.sop_uids)
                if got != len(files):
                    raise PushFailed(f"instrumented listener stored {got} of {len(files)}")
                if rnd:
                    walls["gateway"].append(secs)
        finally:
            listener.stop()
            state.close()

    n = len(files)
    wall = statistics.mean(walls["gateway"])
    handler = sum(timer.seconds.values()) / rounds
    rows = []
    phases = []
    for label, secs in timer.seconds.most_common():
        per_push = secs / rounds
        phases.append(
            {
                "phase": label,
                "ms_per_push": round(per_push * 1000, 1),
                "us_per_instance": round(per_push / n * 1e6),
                "calls_per_instance": round(timer.calls[label] / rounds / n, 2),
                "pct_of_wall": round(100 * per_push / wall, 1),
            }
        )
        rows.append(
            (
                label,
                f"{per_push * 1000:.1f}",
                f"{per_push / n * 1e6:.0f}",
                f"{100 * per_push / wall:.1f}",
            )
        )
    outside = wall - handler
    rows.append(
        (
            "(outside the handler: receive, storescu)",
            f"{outside * 1000:.1f}",
            f"{outside / n * 1e6:.0f}",
            f"{100 * outside / wall:.1f}",
        )
    )
    floor = statistics.median(walls["floor"])
    print(
        f"\nbreakdown: in-process Listener, {n} instances/push, mean of {rounds} pushes "
        f"({wall:.3f} s; timers add a little). Floor = same AE answering without "
        f"storing: {floor:.3f} s"
    )
    print_table(["phase", "ms/push", "us/instance", "% of wall"], rows)
    if skipped:
        print(f"  (not found, not timed: {', '.join(skipped)})")
    return {
        "instrumented_wall_s": round(wall, 4),
        "instrumented_walls_s": [round(w, 4) for w in walls["gateway"]],
        "floor_walls_s": [round(w, 4) for w in walls["floor"]],
        "floor_median_s": round(floor, 4),
        "handler_s_per_push": round(handler, 4),
        "phases": phases,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------- --profile


def _py_spy() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


_BORING = ("threading.py", "socketserver.py")


def _frame_name(frame: str) -> str | None:
    """``handle_store (dicom_gateway/durable/scp.py:231)`` -> ``handle_store (scp.py)``; None for
    py-spy's process/thread pseudo-frames and thread start-up boilerplate."""
    func, sep, where = frame.partition(" (")
    if not sep or func in ("process", "thread") or func.startswith("process "):
        return None
    file = where.split(":")[0].rsplit("/", 1)[-1]
    return None if file in _BORING else f"{func} ({file})"


def _summarise_folded(folded: Path, top: int = 25) -> list[tuple[str, float, float]]:
    """(function, inclusive %, self %) from py-spy's raw (collapsed stack) output.

    py-spy leaves out idle threads by default, and a thread blocked in fsync counts as idle:
    this is on-CPU time. ``--breakdown`` has the wall-clock view.
    """
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [n for n in map(_frame_name, stack.split(";")) if n is not None]
        if not frames:
            continue
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return []
    return [(f, 100.0 * c / total, 100.0 * own[f] / total) for f, c in inclusive.most_common(top)]


def _profile_gateway(
    gateway: GatewayTarget,
    files: list[Path],
    profile: StorescuProfile,
    inbox: Path,
    out_dir: Path,
    salt: str,
) -> dict[str, Any]:
    spy = _py_spy()
    if spy is None:
        print(
            f"py-spy not found: {Path(sys.executable).parent}/pip install py-spy", file=sys.stderr
        )
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    folded = out_dir / "gateway-ingest.folded"
    pushed = restamp(files, inbox / salt, salt=salt)
    flush_page_cache_writes()
    spy_proc = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(gateway.pid),
            "--rate",
            "500",
            "--format",
            "raw",
            "--output",
            str(folded),
            "--nonblocking",
            "--threads",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # let py-spy attach before the push starts
        seconds = storescu_push(pushed, gateway.host, gateway.port, gateway.aet, profile)
    finally:
        spy_proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            _, err = spy_proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            _, err = spy_proc.communicate()
        shutil.rmtree(inbox / salt, ignore_errors=True)
    if not folded.exists():
        print(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}", file=sys.stderr)
        return {"seconds_under_py_spy": round(seconds, 3)}
    rows = _summarise_folded(folded)
    print(f"\npy-spy: one gateway push ({seconds:.3f} s under the sampler), {folded}")
    print("on-CPU samples of the gateway's threads; inclusive counts callees")
    print_table(
        ["function (file)", "incl %", "self %"],
        [(f[:80], f"{inc:.1f}", f"{own:.1f}") for f, inc, own in rows],
    )
    return {
        "seconds_under_py_spy": round(seconds, 3),
        "folded": str(folded),
        "top": [
            {"function": f, "inclusive_pct": round(i, 1), "self_pct": round(s, 1)}
            for f, i, s in rows
        ],
    }


# ---------------------------------------------------------------------------- main


def _fmt_pressure(pressure: dict[str, float]) -> str:
    if not pressure:
        return "no PSI"
    return ", ".join(f"{k.split('_')[0]} {v:.0f}%" for k, v in pressure.items())


def run(args: argparse.Namespace) -> dict[str, Any]:
    files = sample_set(args.ct_slices)
    nbytes = total_bytes(files)
    instances = len(files)
    targets: list[Target] = [GatewayTarget(), OrthancTarget(), StoreSCPTarget()]
    run_id = f"{os.getpid()}-{time.time_ns()}"
    seconds: dict[str, list[float]] = {t.name: [] for t in targets}
    extra: dict[str, Any] = {}
    load_before = load_average()
    pressure: dict[str, float] = {}
    with scratch_dir("telerad-bench-ingest-", args.work_dir) as root, ExitStack() as stack:
        info = machine_info(root)
        print(
            f"ingest: {instances} instances, {nbytes / MB:.1f} MB per push "
            f"({args.ct_slices}-slice CT + chest CR), {args.rounds} rounds + "
            f"{args.warmup} warm-up; work dir {root} ({info['work_dir_fs']}); "
            f"{info['cpus']} CPUs, load average {load_before:.2f}"
        )
        if load_before > 0.5:
            print("  note: the machine is busy; expect noise (see docs/performance.md)")
        profile = StorescuProfile.for_files(files, root / "storescu.cfg")
        inbox = root / "inbox"
        for target in targets:
            stack.callback(target.stop)
            target.start(root)
            print(f"  started {target.describe()} on port {target.port}")
        psi: Pressure | None = None
        for rnd in range(-args.warmup, args.rounds):
            if rnd == 0:
                psi = Pressure()
            label = "warm-up" if rnd < 0 else f"round {rnd + 1}"
            cells = []
            for target in targets:
                secs = _push_once(target, files, profile, inbox, f"{run_id}-{target.name}-{rnd}")
                if rnd >= 0:
                    seconds[target.name].append(secs)
                cells.append(f"{target.name} {secs:.3f} s")
            print(f"  {label:8}: " + ", ".join(cells), flush=True)
        load_after = load_average()
        pressure = psi.percent() if psi is not None else {}
        if args.profile is not None:
            gw = targets[0]
            assert isinstance(gw, GatewayTarget)
            extra["profile"] = _profile_gateway(
                gw, files, profile, inbox, args.profile, f"{run_id}-prof"
            )
        for target in targets:  # free the CPU before the in-process breakdown
            target.stop()
        if args.breakdown:
            extra["breakdown"] = _breakdown(files, profile, root, args.rounds, run_id)

    results = {t.name: _summarise(t.name, seconds[t.name], instances, nbytes) for t in targets}
    gw_r, orth, scp = results["gateway"], results["orthanc"], results["storescp"]
    ratios = {
        "gateway_vs_orthanc": round(orth["median_s"] / gw_r["median_s"], 3),
        "gateway_vs_storescp": round(scp["median_s"] / gw_r["median_s"], 3),
    }
    checks = {
        f"gateway >= {TARGET_VS_ORTHANC:.1f}x orthanc throughput": ratios["gateway_vs_orthanc"]
        >= TARGET_VS_ORTHANC,
        f"gateway >= {TARGET_MB_S:.0f} MB/s": gw_r["mb_per_s"] >= TARGET_MB_S,
    }
    print(
        f"\n{instances} instances, {nbytes / MB:.1f} MB per push, median of {args.rounds} "
        f"(load average {load_before:.2f} before, {load_after:.2f} after the timed rounds; "
        f"pressure during them: {_fmt_pressure(pressure)})"
    )
    print_table(
        ["target", "median s", "min s", "max s", "inst/s", "MB/s", "gateway/this"],
        [
            (
                r["target"],
                f"{r['median_s']:.3f}",
                f"{r['min_s']:.3f}",
                f"{r['max_s']:.3f}",
                f"{r['instances_per_s']:.0f}",
                f"{r['mb_per_s']:.1f}",
                f"{r['median_s'] / gw_r['median_s']:.2f}x",
            )
            for r in results.values()
        ],
    )
    print("gateway/this: the gateway's throughput divided by this target's (>1: gateway faster)")
    print(
        f"gateway/orthanc {ratios['gateway_vs_orthanc']:.2f}x, "
        f"gateway/storescp {ratios['gateway_vs_storescp']:.2f}x"
    )
    for name, ok in checks.items():
        print(f"  target {name}: {'met' if ok else 'NOT met'}")
    return {
        "benchmark": "ingest",
        "machine": info,
        "load_average": {"before": load_before, "after": load_after},
        "pressure_during_timed_rounds": pressure,
        "params": {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "ct_slices": args.ct_slices,
            "instances": instances,
            "bytes": nbytes,
            "sender": "DCMTK storescu, one association, TCP_NODELAY=1",
            "gateway_hub": None,
        },
        "results": results,
        "ratios": ratios,
        "targets": {k: bool(v) for k, v in checks.items()},
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed pushes per target")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--ct-slices", type=int, default=DEFAULT_CT_SLICES)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="parent of the peers' storage (default: the temp dir); fsync cost depends on it",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="then time each step of the gateway's C-STORE path (in-process) and the floor",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="then sample one gateway push with py-spy, raw stacks into DIR",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.ct_slices < 1:
        parser.error("--rounds and --ct-slices must be >= 1, --warmup >= 0")
    if not dcmtk_available() or not orthanc_available():
        print(
            "needs DCMTK (storescu, storescp) and Orthanc: apt-get install dcmtk orthanc",
            file=sys.stderr,
        )
        return 2
    sigterm_as_exit()
    payload = run(args)
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
