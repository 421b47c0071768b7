"""Footprint: the gateway's peak memory while a modality pushes a 1,000-image CT.

``python -m benchmarks.footprint [--slices 1000] [--interval 0.02] [--json OUT] [--no-peers]``

A 512x512 CT series of ``--slices`` images (~525 MB at 1,000; generated once into the
benchmark cache, see ``benchmarks/_common.py``) is pushed by DCMTK ``storescu`` in one
association into a fresh ``telerad gateway serve`` process (no hub URL: the forwarder does
not run). While it receives, ``/proc/<pid>/status`` is sampled every ``--interval`` seconds
for ``VmRSS``; at the end ``VmHWM`` (the kernel's own peak-RSS high-water mark, which no
sampling interval can miss) is read before the process stops. The issue's target is a
VmHWM of at most 200 MB. The same push into Orthanc and DCMTK ``storescp`` (fresh each, one
after the other, not at the same time) gives the peers' numbers for comparison.

RSS counts the process's own memory, not the page cache that holds the files it wrote.
MB here are decimal (10^6 bytes), like the target.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks._common import (
    MB,
    GatewayTarget,
    OrthancTarget,
    Pressure,
    PushFailed,
    StoreSCPTarget,
    StorescuProfile,
    Target,
    ct_series,
    flush_page_cache_writes,
    instance_ids,
    load_average,
    machine_info,
    print_table,
    proc_status_kb,
    scratch_dir,
    sigterm_as_exit,
    storescu_push,
    total_bytes,
    write_json,
)
from tests.support.peers import dcmtk_available, orthanc_available

TARGET_PEAK_MB = 200.0
_KB = 1024


class RssSampler(threading.Thread):
    """Polls VmRSS/VmHWM of one process until stopped; keeps the maxima and a coarse trace."""

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.max_rss_kb = 0
        self.max_hwm_kb = 0
        self.samples = 0
        self.trace: list[tuple[float, int]] = []  # (seconds since start, VmRSS kB), ~1/s
        self._stop_event = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        next_trace = 0.0
        while not self._stop_event.is_set():
            status = proc_status_kb(self.pid)
            if not status:
                break  # the process is gone
            self.samples += 1
            rss = status.get("VmRSS", 0)
            self.max_rss_kb = max(self.max_rss_kb, rss)
            self.max_hwm_kb = max(self.max_hwm_kb, status.get("VmHWM", 0))
            now = time.monotonic() - started
            if now >= next_trace:
                self.trace.append((round(now, 2), rss))
                next_trace = now + 1.0
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _mb(kb: int) -> float:
    return kb * _KB / MB


def measure(
    target: Target,
    root: Path,
    files: list[Path],
    profile: StorescuProfile,
    interval_s: float,
) -> dict[str, Any]:
    """Start ``target`` fresh, push ``files`` once, return its memory numbers; stop it."""
    ids = instance_ids(files)
    try:
        target.start(root)
        time.sleep(1.0)  # settle: start-up imports and allocations are in the baseline
        pid = target.pid
        baseline = proc_status_kb(pid)
        sampler = RssSampler(pid, interval_s)
        flush_page_cache_writes()
        sampler.start()
        try:
            seconds = storescu_push(files, target.host, target.port, target.aet, profile)
        finally:
            sampler.stop()
        final = proc_status_kb(pid)
        got = target.stored(ids)
        if got != len(files):
            raise PushFailed(f"{target.name} holds {got} of {len(files)} pushed instances")
    finally:
        target.stop()
        shutil.rmtree(root / target.name, ignore_errors=True)  # ~0.5 GB per target
    nbytes = total_bytes(files)
    hwm = max(final.get("VmHWM", 0), sampler.max_hwm_kb)
    return {
        "target": target.name,
        "baseline_rss_mb": round(_mb(baseline.get("VmRSS", 0)), 1),
        "peak_sampled_rss_mb": round(_mb(sampler.max_rss_kb), 1),
        "vm_hwm_mb": round(_mb(hwm), 1),
        "final_rss_mb": round(_mb(final.get("VmRSS", 0)), 1),
        "samples": sampler.samples,
        "push_s": round(seconds, 3),
        "mb_per_s": round(nbytes / MB / seconds, 1),
        "rss_trace_kb": sampler.trace,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    files = ct_series(args.slices)
    nbytes = total_bytes(files)
    targets: list[Target] = [GatewayTarget()]
    if args.peers:
        targets += [OrthancTarget(), StoreSCPTarget()]
    load_before = load_average()
    results: dict[str, dict[str, Any]] = {}
    with scratch_dir("telerad-bench-footprint-", args.work_dir) as root, ExitStack() as stack:
        info = machine_info(root)
        print(
            f"footprint: {len(files)}-image CT, {nbytes / MB:.0f} MB, one storescu association; "
            f"work dir {root}; {info['cpus']} CPUs, load average {load_before:.2f}"
        )
        profile = StorescuProfile.for_files(files, root / "storescu.cfg")
        psi = Pressure()
        for target in targets:
            stack.callback(target.stop)  # idempotent; covers an interrupted measure()
            res = measure(target, root, files, profile, args.interval)
            results[target.name] = res
            print(
                f"  {target.name:8}: VmHWM {res['vm_hwm_mb']:.1f} MB "
                f"(baseline {res['baseline_rss_mb']:.1f} MB), push {res['push_s']:.2f} s",
                flush=True,
            )
        pressure = psi.percent()
    load_after = load_average()
    gw = results["gateway"]
    ok = gw["vm_hwm_mb"] <= TARGET_PEAK_MB
    print(
        f"\n{len(files)} images, {nbytes / MB:.0f} MB in one association "
        f"(load average {load_before:.2f} before, {load_after:.2f} after; pressure: "
        + (", ".join(f"{k.split('_')[0]} {v:.0f}%" for k, v in pressure.items()) or "no PSI")
        + ")"
    )
    print_table(
        ["target", "baseline MB", "peak sampled MB", "VmHWM MB", "push s", "MB/s"],
        [
            (
                r["target"],
                f"{r['baseline_rss_mb']:.1f}",
                f"{r['peak_sampled_rss_mb']:.1f}",
                f"{r['vm_hwm_mb']:.1f}",
                f"{r['push_s']:.2f}",
                f"{r['mb_per_s']:.1f}",
            )
            for r in results.values()
        ],
    )
    ratios: dict[str, float] = {}
    for peer in ("orthanc", "storescp"):
        if peer in results and results[peer]["vm_hwm_mb"]:
            ratios[f"gateway_vs_{peer}_hwm"] = round(
                gw["vm_hwm_mb"] / results[peer]["vm_hwm_mb"], 2
            )
    if ratios:
        print(
            "gateway VmHWM / peer VmHWM: "
            + ", ".join(f"{k.split('_')[2]} {v:.2f}x" for k, v in ratios.items())
        )
    print(
        f"  target gateway VmHWM <= {TARGET_PEAK_MB:.0f} MB: {'met' if ok else 'NOT met'} "
        f"({gw['vm_hwm_mb']:.1f} MB)"
    )
    return {
        "benchmark": "footprint",
        "machine": info,
        "load_average": {"before": load_before, "after": load_after},
        "pressure": pressure,
        "params": {
            "slices": len(files),
            "bytes": nbytes,
            "interval_s": args.interval,
            "sender": "DCMTK storescu, one association, TCP_NODELAY=1",
            "gateway_hub": None,
        },
        "results": results,
        "ratios": ratios,
        "targets": {f"gateway VmHWM <= {TARGET_PEAK_MB:.0f} MB": ok},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.footprint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--slices", type=int, default=1000, help="CT images in the push")
    parser.add_argument("--interval", type=float, default=0.02, help="RSS sampling period, s")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="measure the gateway only (skip Orthanc and storescp)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="parent of the receivers' storage"
    )
    args = parser.parse_args(argv)
    if args.slices < 1 or args.interval <= 0:
        parser.error("--slices must be >= 1 and --interval > 0")
    if not dcmtk_available() or (args.peers and not orthanc_available()):
        print("needs DCMTK (storescu, storescp) and Orthanc, or --no-peers", file=sys.stderr)
        return 2
    sigterm_as_exit()
    payload = run(args)
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
