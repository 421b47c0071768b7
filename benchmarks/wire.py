"""Wire benchmark: bytes and time from the station to the hub over a slow link, with peers.

Questions, each answered against a peer measured in the same run:

1. **Wire ratio**: bytes that reach the hub ÷ raw DICOM bytes, for the sample CT and the CR,
   measured on a real TCP connection (a :class:`FaultProxy` without limits between gateway
   and hub counts every byte: HTTP, manifest, bundles, commit), next to the pure codec ratio
   (``telerad.core.wire.write_bundle``) and pydicom's JPEG-LS lossless files. Target: CT ≤ 0.45.
2. **Time over a bad link** (2 Mbit/s, 150 ms one way = 300 ms RTT): from the first C-STORE
   into the gateway (``storescu`` is started) to the last instance held at the hub, compared
   to the ideal = JPEG-LS lossless bytes of the study ÷ link rate (target ≤ 1.1x). Commit is
   reported separately: it waits for the gateway's quiet period (2 s here), which is policy,
   not transfer. Peers through the same proxy settings: DCMTK ``storescu`` → ``storescp``
   with the raw files and with JPEG-LS copies (pydicom ``ds.compress(JPEGLSLossless)``).
3. **STAT pre-emption** (10 Mbit/s, 150 ms one way, so the run stays short): a STAT CR
   pushed while ~200 MB of routine CT is being forwarded; time from the CR being made durable
   at the gateway (before its C-STORE Success) to it being held at the hub, against its own
   transfer time (its bundle bytes ÷ link rate) + 10 s.

Gateway and hub run as separate processes (``telerad … serve``), the proxy in this process.
Everything listens on 127.0.0.1 and is stopped and deleted at the end, also on failure or
Ctrl-C. ``--quick`` uses 30 CT slices and a ~50 MB backlog (about 3 minutes); the default
(120 slices, ~200 MB backlog) takes about 9 minutes, mostly the two C-STORE peers.

    python -m benchmarks.wire [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

from sample_studies.generate import DEFAULT_SEED, generate_samples, make_cr, restamp
from telerad.core.wire import BundleEntry, write_bundle
from tests.support.faultproxy import FaultProxy
from tests.support.peers import StoreSCP, dcmtk_available, storescu
from tests.support.telerad_procs import GatewayProcess, HubProcess

SECTIONS = ("ratio", "badlink", "peers", "stat")

BAD_LINK_BPS = 2_000_000
STAT_LINK_BPS = 10_000_000
LATENCY_S = 0.150  # one way: 300 ms round trip
QUIET_PERIOD_S = 2.0  # gateway: seconds without a new instance before the study is committed
RATIO_TARGET = 0.45
TIME_TARGET = 1.10
STAT_ALLOWANCE_S = 10.0
POLL_S = 0.05
SAMPLE_S = 0.05
GAP_MIN_S = 0.2  # link idle at least this long counts as a gap in the timeline

T = TypeVar("T")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Measuring helpers
# --------------------------------------------------------------------------------------------


class LinkSampler:
    """Samples the proxy's delivered-byte counters, so idle periods of the link can be found."""

    def __init__(self, proxy: FaultProxy, period_s: float = SAMPLE_S) -> None:
        self.proxy = proxy
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-sampler", daemon=True)

    def __enter__(self) -> LinkSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.proxy.bytes_up, self.proxy.bytes_down))
            self._stop.wait(self.period_s)

    def first_up_after(self, start: float, baseline: int) -> float | None:
        for t, up, _ in list(self.samples):
            if t >= start and up > baseline:
                return t
        return None

    def last_up_change(self, until: float) -> float | None:
        last: float | None = None
        prev: int | None = None
        for t, up, _ in list(self.samples):
            if t > until:
                break
            if prev is not None and up != prev:
                last = t
            prev = up
        return last

    def gaps(
        self, start: float, end: float, min_gap_s: float = GAP_MIN_S
    ) -> list[dict[str, float]]:
        """Periods in [start, end] during which no upstream byte was delivered."""
        out: list[dict[str, float]] = []
        last_change = start
        prev: int | None = None
        for t, up, _ in list(self.samples):
            if t < start:
                prev = up
                continue
            if t > end:
                break
            if prev is not None and up != prev:
                # The change happened somewhere in the last sampling period.
                idle = (t - self.period_s) - last_change
                if idle >= min_gap_s:
                    out.append({"start": last_change, "seconds": idle})
                last_change = t
            prev = up
        tail = end - last_change
        if tail >= min_gap_s:
            out.append({"start": last_change, "seconds": tail})
        return out


class HubDB:
    """Reads the hub's SQLite database (WAL mode, so reading never blocks the hub)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(str(path), timeout=10, check_same_thread=False)

    def close(self) -> None:
        self.conn.close()

    def held(self, study_uid: str) -> tuple[int, float | None]:
        row = self.conn.execute(
            "SELECT count(*), max(received_at) FROM hub_instances WHERE study_uid = ?",
            (study_uid,),
        ).fetchone()
        return int(row[0]), row[1]

    def all_held(self, study_uid: str, count: int) -> tuple[int, float | None] | None:
        """``held()`` once at least ``count`` instances are held, else None."""
        held = self.held(study_uid)
        return held if held[0] >= count else None

    def committed_at(self, study_uid: str) -> float | None:
        row = self.conn.execute(
            "SELECT committed_at FROM hub_studies WHERE study_uid = ? AND state = 'committed'",
            (study_uid,),
        ).fetchone()
        return None if row is None else float(row[0])

    def instance_received_at(self, sop_uid: str) -> float | None:
        row = self.conn.execute(
            "SELECT received_at FROM hub_instances WHERE sop_instance_uid = ?", (sop_uid,)
        ).fetchone()
        return None if row is None else float(row[0])


def wait_for(
    predicate: Callable[[], T | None], deadline_s: float, what: str, poll_s: float = POLL_S
) -> tuple[T, float]:
    """Poll until ``predicate`` returns a truthy value; return it and the wall time seen."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value, time.time()
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
_HUB_EVENTS = (("hub-held", re.compile(r"upload \S+ from \S+: (\d+) instances held")),)
_EVENTS = (
    ("packed", re.compile(r"packed (\d+) instances of \S+: (\d+) raw -> (\d+) wire bytes")),
    ("held", re.compile(r"bundle (\d+) of \S+ held by the hub \((\d+) instances\)")),
    ("pre-empted", re.compile(r"bundle (\d+) of \S+ pre-empted at (\d+)/(\d+)")),
    ("committed", re.compile(r"study \S+ committed at hub")),
    ("retry", re.compile(r"retry #\d+")),
)


def log_events(
    log_path: Path, since: float, patterns: Sequence[tuple[str, re.Pattern[str]]]
) -> list[dict[str, Any]]:
    """Events from a telerad log (its asctime has millisecond resolution)."""
    events: list[dict[str, Any]] = []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        match = _LOG_LINE.match(line)
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if stamp < since - 1:
            continue
        for kind, pattern in patterns:
            found = pattern.search(match.group(2))
            if found:
                events.append({"t": stamp, "kind": kind, "fields": [*found.groups()]})
                break
    return events


def socket_queues(port: int) -> dict[str, int] | None:
    """Bytes waiting in kernel buffers on the loopback hop into the proxy (``ss``).

    ``proxy_recv_q``: received by the proxy's socket, not yet read into the link model;
    ``sender_send_q``: still in the sender's socket (not yet accepted by the proxy's side).
    On a real link neither queue exists in this form: the sender's TCP window would hold back
    roughly one bandwidth-delay product (plus the bottleneck router's queue).
    """
    try:
        out = subprocess.run(
            ["ss", "-tnH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    queues = {"proxy_recv_q": 0, "sender_send_q": 0}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4 or not (parts[0].isdigit() and parts[1].isdigit()):
            continue
        if parts[2].endswith(f":{port}"):  # local end is the proxy's listening port
            queues["proxy_recv_q"] += int(parts[0])
        else:
            queues["sender_send_q"] += int(parts[1])
    return queues


def machine_load() -> dict[str, float]:
    """Load average and pressure-stall "some avg60" (CPU, I/O): a busy VM skews timings."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        out["load_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
    for kind in ("cpu", "io"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            first = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
            fields = dict(item.split("=") for item in first.split()[1:])
            out[f"psi_{kind}_some_avg60"] = float(fields["avg60"])
    return out


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Study:
    name: str
    files: list[Path]
    study_uid: str
    sop_uids: list[str]
    raw_bytes: int
    bundle_bytes: int = 0
    jpegls_files: list[Path] = field(default_factory=list)
    jpegls_bytes: int = 0

    @property
    def count(self) -> int:
        return len(self.files)


class _Counter:
    def __init__(self) -> None:
        self.length = 0

    def write(self, data: bytes) -> int:
        self.length += len(data)
        return len(data)


def load_study(name: str, files: Sequence[Path]) -> Study:
    uids = [dcmread(p, stop_before_pixels=True) for p in files]
    studies = {str(ds.StudyInstanceUID) for ds in uids}
    if len(studies) != 1:
        raise ValueError(f"{name}: expected one study, got {len(studies)}")
    return Study(
        name=name,
        files=list(files),
        study_uid=studies.pop(),
        sop_uids=[str(ds.SOPInstanceUID) for ds in uids],
        raw_bytes=sum(p.stat().st_size for p in files),
    )


def measure_codec(study: Study, jpegls_dir: Path | None) -> dict[str, Any]:
    """Bundle bytes from the wire codec and, optionally, pydicom JPEG-LS lossless copies."""

    def entries() -> Iterator[tuple[BundleEntry, bytes]]:
        for path, sop_uid in zip(study.files, study.sop_uids, strict=True):
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            yield BundleEntry(sop_uid, study.study_uid, digest, len(data)), data

    started = time.perf_counter()
    stats = write_bundle(_Counter(), entries())  # type: ignore[arg-type]
    codec_s = time.perf_counter() - started
    study.bundle_bytes = stats.wire_bytes
    result: dict[str, Any] = {
        "instances": study.count,
        "raw_bytes": study.raw_bytes,
        "bundle_bytes": stats.wire_bytes,
        "bundle_ratio": stats.wire_bytes / study.raw_bytes,
        "encode_seconds": round(codec_s, 3),
    }
    if jpegls_dir is not None:
        jpegls_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for path in study.files:
            ds = dcmread(path)
            ds.compress(JPEGLSLossless)
            out = jpegls_dir / path.name
            ds.save_as(out, enforce_file_format=True)
            study.jpegls_files.append(out)
        study.jpegls_bytes = sum(p.stat().st_size for p in study.jpegls_files)
        result["jpegls_bytes"] = study.jpegls_bytes
        result["jpegls_ratio"] = study.jpegls_bytes / study.raw_bytes
        result["jpegls_seconds"] = round(time.perf_counter() - started, 3)
    return result


def bundle_boundaries(
    events: Sequence[dict[str, Any]], gaps: Sequence[dict[str, float]]
) -> list[dict[str, float]]:
    """Where the link idles between two bundles, split by what the peers were doing.

    ``unpack``: hub got the last byte of bundle N -> hub finished unpacking it (hub log);
    ``response``: -> gateway recorded the PATCH answer (one-way latency + bookkeeping);
    ``pack``: -> gateway packed bundle N+1 (includes a manifest round trip on a new pass);
    ``create``: -> first PATCH byte of bundle N+1 reached the hub (POST round trip + latency).
    Times come from the link timeline (hub side of the proxy) and the two processes' logs.
    """
    out: list[dict[str, float]] = []
    gateway_held = [e for e in events if e["kind"] == "held"]
    for held in gateway_held:
        t_resp = float(held["t"])
        around = [g for g in gaps if g["start"] <= t_resp <= g["start"] + g["seconds"] + 0.1]
        packed = [e for e in events if e["kind"] == "packed" and float(e["t"]) >= t_resp]
        hub = [e for e in events if e["kind"] == "hub-held" and float(e["t"]) <= t_resp]
        if not around or not packed or not hub:
            continue  # the last bundle, or the timeline could not place it
        t_last = around[0]["start"]
        t_hub = max(float(hub[-1]["t"]), t_last)
        t_pack = float(packed[0]["t"])
        after = [g for g in gaps if g["start"] >= t_pack - 0.1]
        if not after:
            continue
        t_resume = after[0]["start"] + after[0]["seconds"]
        out.append(
            {
                "at_s": t_last,
                "unpack": round(t_hub - t_last, 3),
                "response": round(t_resp - t_hub, 3),
                "pack": round(t_pack - t_resp, 3),
                "create": round(t_resume - t_pack, 3),
                "total": round(t_resume - t_last, 3),
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Running telerad
# --------------------------------------------------------------------------------------------


@dataclass
class Pair:
    hub: HubProcess
    gateway: GatewayProcess
    proxy: FaultProxy
    db: HubDB

    def push(self, paths: Sequence[Path], timeout_s: float = 600.0) -> None:
        res = storescu(
            paths,
            "127.0.0.1",
            self.gateway.dicom_port,
            self.gateway.aet,
            "MODALITY",
            timeout_s=timeout_s,
        )
        if res.returncode != 0:
            raise RuntimeError(f"storescu into the gateway failed: {res.stderr[-2000:]}")

    def gateway_received_at(self, sop_uid: str) -> float | None:
        conn = sqlite3.connect(str(self.gateway.data_dir / "gateway.sqlite3"), timeout=10)
        try:
            row = conn.execute(
                "SELECT received_at FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
            ).fetchone()
        finally:
            conn.close()
        return None if row is None else float(row[0])

    def events(self, since: float) -> list[dict[str, Any]]:
        """Gateway forwarding events and the hub's "bundle unpacked" events, by time."""
        events = log_events(self.gateway.log_path, since, _EVENTS)
        events += log_events(self.hub.log_path, since, _HUB_EVENTS)
        return sorted(events, key=lambda e: float(e["t"]))


@contextlib.contextmanager
def telerad_pair(
    work: Path,
    name: str,
    *,
    bandwidth_bps: float | None,
    latency_s: float,
    gateway_env: dict[str, str],
) -> Iterator[Pair]:
    """Hub process, proxy (the link) and gateway process; all stopped on exit."""
    with contextlib.ExitStack() as stack:
        hub = HubProcess(work / f"{name}-hub")
        stack.callback(hub.kill9)  # also covers a start that timed out with the process alive
        stack.enter_context(hub)
        token = hub.add_station(f"bench-{name}")
        proxy = stack.enter_context(FaultProxy("127.0.0.1", hub.http_port))
        proxy.bandwidth_bps = bandwidth_bps
        proxy.latency_s = latency_s
        env = {"TELERAD_QUIET_PERIOD_S": f"{QUIET_PERIOD_S:g}", **gateway_env}
        gateway = GatewayProcess(
            work / f"{name}-gw",
            hub_url=f"http://127.0.0.1:{proxy.port}",
            token=token,
            aet="TELERAD_GW",
            env=env,
        )
        stack.callback(gateway.kill9)  # runs after stop(): a no-op unless stop() timed out
        stack.enter_context(gateway)
        db = HubDB(hub.data_dir / "hub.sqlite3")
        stack.callback(db.close)
        try:
            yield Pair(hub=hub, gateway=gateway, proxy=proxy, db=db)
        except BaseException:
            # Failed or interrupted: the data is thrown away, so don't wait for a graceful
            # stop (a gateway in the middle of a PATCH over a slow link takes ~20 s).
            gateway.kill9()
            hub.kill9()
            raise


def run_wire_ratio(work: Path, studies: Sequence[Study], env: dict[str, str]) -> dict[str, Any]:
    """Bytes the hub receives for each study over an unlimited proxy, commit included."""
    out: dict[str, Any] = {}
    with telerad_pair(work, "ratio", bandwidth_bps=None, latency_s=0.0, gateway_env=env) as pair:
        for study in studies:
            up0, down0 = pair.proxy.bytes_up, pair.proxy.bytes_down
            t0 = time.time()
            pair.push(study.files)
            _, t_held = wait_for(
                functools.partial(pair.db.all_held, study.study_uid, study.count),
                300,
                f"{study.name} held at the hub",
            )
            up_held = pair.proxy.bytes_up - up0
            _, t_commit = wait_for(
                functools.partial(pair.db.committed_at, study.study_uid),
                120,
                f"{study.name} committed",
            )
            time.sleep(0.3)  # let the commit response and any trailing bytes through
            up = pair.proxy.bytes_up - up0
            out[study.name] = {
                "instances": study.count,
                "raw_bytes": study.raw_bytes,
                "wire_bytes_held": up_held,
                "wire_bytes": up,
                "wire_ratio": up / study.raw_bytes,
                "bytes_down": pair.proxy.bytes_down - down0,
                "held_s": round(t_held - t0, 2),
                "committed_s": round(t_commit - t0, 2),
            }
            log(f"wire ratio {study.name}: {up} / {study.raw_bytes} = {up / study.raw_bytes:.4f}")
    return out


def run_telerad_bad_link(
    work: Path, study: Study, rate_bps: float, env: dict[str, str]
) -> dict[str, Any]:
    """storescu -> gateway -> proxy (slow, far) -> hub; when is the last instance held?"""
    with (
        telerad_pair(
            work, "badlink", bandwidth_bps=rate_bps, latency_s=LATENCY_S, gateway_env=env
        ) as pair,
        LinkSampler(pair.proxy) as sampler,
    ):
        up0 = pair.proxy.bytes_up
        t0 = time.time()
        pair.push(study.files)
        t_pushed = time.time()
        deadline = 60 + 4 * study.raw_bytes * 8 / rate_bps
        (_, last_received), t_held = wait_for(
            functools.partial(pair.db.all_held, study.study_uid, study.count),
            deadline,
            "the CT held at the hub",
        )
        up_held = pair.proxy.bytes_up - up0
        committed_at, t_commit = wait_for(
            lambda: pair.db.committed_at(study.study_uid), 120, "the CT committed at the hub"
        )
        time.sleep(0.5)
        up_total = pair.proxy.bytes_up - up0
        first_byte = sampler.first_up_after(t0, up0)
        last_byte = sampler.last_up_change(t_held)
        events = pair.events(t0)
        gaps = sampler.gaps(first_byte or t0, t_held)
        boundaries = bundle_boundaries(events, gaps)
        first_received = pair.gateway_received_at(study.sop_uids[0])
    busy_s = up_held * 8 / rate_bps
    held_s = t_held - t0
    span = (last_byte or t_held) - (first_byte or t0)
    idle_inside = sum(g["seconds"] for g in gaps if g["start"] < (last_byte or t_held))
    sending_rate = up_held * 8 / max(span - idle_inside, 1e-3)
    bundles = [e for e in events if e["kind"] == "packed"]
    result: dict[str, Any] = {
        "held_s": round(held_s, 2),
        "committed_s": round(t_commit - t0, 2),
        "hub_committed_at_s": round(committed_at - t0, 2),
        "hub_last_received_at_s": round(float(last_received) - t0, 2) if last_received else None,
        "push_s": round(t_pushed - t0, 2),
        "first_instance_durable_s": round(first_received - t0, 3) if first_received else None,
        "first_byte_s": round(first_byte - t0, 2) if first_byte else None,
        "last_byte_s": round(last_byte - t0, 2) if last_byte else None,
        "wire_bytes_held": up_held,
        "wire_bytes_total": up_total,
        "link_busy_s": round(busy_s, 2),
        "link_idle_s": round(held_s - busy_s, 2),
        "bundles": [
            {
                "t_s": round(e["t"] - t0, 2),
                "instances": int(e["fields"][0]),
                "raw": int(e["fields"][1]),
                "wire": int(e["fields"][2]),
            }
            for e in bundles
        ],
        "events": [
            {"t_s": round(e["t"] - t0, 3), "kind": e["kind"], "fields": e["fields"]} for e in events
        ],
        "gaps": [
            {"start_s": round(g["start"] - t0, 2), "seconds": round(g["seconds"], 2)} for g in gaps
        ],
        "gaps_total_s": round(sum(g["seconds"] for g in gaps), 2),
        "rate_while_sending_bps": round(sending_rate),
        "boundaries": [{**b, "at_s": round(b["at_s"] - t0, 2)} for b in boundaries],
        "proxy_connections": pair.proxy.connections,
    }
    return result


def run_cstore_peer(
    work: Path, name: str, files: Sequence[Path], rate_bps: float
) -> dict[str, Any]:
    """DCMTK storescu -> proxy (same link) -> storescp; storescu waits for every response."""
    with (
        StoreSCP(workdir=work / f"{name}-storescp") as scp,
        FaultProxy("127.0.0.1", scp.port) as proxy,
    ):
        proxy.bandwidth_bps = rate_bps
        proxy.latency_s = LATENCY_S
        t0 = time.time()
        res = storescu(files, "127.0.0.1", proxy.port, scp.aet, "MODALITY", timeout_s=3600)
        elapsed = time.time() - t0
        if res.returncode != 0:
            raise RuntimeError(f"storescu ({name}) failed: {res.stderr[-2000:]}")
        received = len(scp.received_files())
        if received != len(files):
            raise RuntimeError(f"storescp ({name}) got {received}/{len(files)} files")
        return {
            "seconds": round(elapsed, 2),
            "files": len(files),
            "file_bytes": sum(p.stat().st_size for p in files),
            "wire_bytes": proxy.bytes_up,
        }


def run_stat(
    work: Path,
    routine: Sequence[Study],
    stat: Study,
    rate_bps: float,
    env: dict[str, str],
    start_after_bytes: int,
) -> dict[str, Any]:
    """A STAT CR pushed while a routine backlog is being forwarded."""
    with (
        telerad_pair(
            work, "stat", bandwidth_bps=rate_bps, latency_s=LATENCY_S, gateway_env=env
        ) as pair,
        LinkSampler(pair.proxy) as sampler,
    ):
        t0 = time.time()
        pair.push([p for s in routine for p in s.files])
        t_routine = time.time()
        wait_for(
            lambda: pair.proxy.bytes_up >= start_after_bytes,
            120 + start_after_bytes * 8 / rate_bps,
            "routine forwarding under way",
        )
        queue_before = socket_queues(pair.proxy.port)
        up_at_stat = pair.proxy.bytes_up
        t_push = time.time()
        pair.push(stat.files)
        t_pushed = time.time()
        durable = pair.gateway_received_at(stat.sop_uids[0])
        if durable is None:
            raise RuntimeError("the STAT CR is not recorded at the gateway")
        queue_after = socket_queues(pair.proxy.port)
        received_at, t_held = wait_for(
            lambda: pair.db.instance_received_at(stat.sop_uids[0]), 300, "the STAT CR held"
        )
        up_at_held = pair.proxy.bytes_up
        events = pair.events(t0)
        routine_held = sum(pair.db.held(s.study_uid)[0] for s in routine)
        gaps = sampler.gaps(durable, t_held)
        pair.gateway.kill9()  # the rest of the backlog is of no interest: stop at once
    own_s = stat.bundle_bytes * 8 / rate_bps
    latency = t_held - durable
    after = [
        {"t_s": round(e["t"] - durable, 3), "kind": e["kind"], "fields": e["fields"]}
        for e in events
        if e["t"] >= durable - 0.5
    ]
    return {
        "link_bps": rate_bps,
        "routine_studies": len(routine),
        "routine_instances": sum(s.count for s in routine),
        "routine_raw_bytes": sum(s.raw_bytes for s in routine),
        "routine_push_s": round(t_routine - t0, 2),
        "stat_pushed_at_s": round(t_push - t0, 2),
        "stat_cstore_s": round(t_pushed - t_push, 3),
        "bytes_up_before_stat": up_at_stat,
        "bytes_up_durable_to_held": up_at_held - up_at_stat,
        "stat_bundle_bytes": stat.bundle_bytes,
        "stat_raw_bytes": stat.raw_bytes,
        "own_transfer_s": round(own_s, 2),
        "limit_s": round(own_s + STAT_ALLOWANCE_S, 2),
        "latency_s": round(latency, 2),
        "hub_received_at_after_durable_s": round(received_at - durable, 2),
        "within_target": latency <= own_s + STAT_ALLOWANCE_S,
        "routine_instances_held_meanwhile": routine_held,
        "loopback_queue_bytes_before": queue_before,
        "loopback_queue_bytes_after": queue_after,
        "gaps": [
            {"start_s": round(g["start"] - durable, 2), "seconds": round(g["seconds"], 2)}
            for g in gaps
        ],
        "events": after,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _queued(queues: dict[str, int] | None) -> str:
    if not queues:
        return "unknown"
    return f"{_mb(sum(queues.values()))} MB ({', '.join(f'{k} {v}' for k, v in queues.items())})"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    cfg = results["config"]
    codec = results.get("codec", {})
    if "ratio" in results:
        lines += [
            "",
            "Wire ratio: bytes to the hub / raw DICOM bytes (lower is better)",
            f"{'study':<18}{'raw MB':>8}{'on the wire':>13}{'codec':>8}{'JPEG-LS files':>15}"
            f"{'target':>9}",
        ]
        for name, wire in results["ratio"].items():
            c = codec.get(name, {})
            target = f"<= {RATIO_TARGET:.2f}" if name == "CT" else ""
            mark = ""
            if name == "CT":
                mark = "  ok" if wire["wire_ratio"] <= RATIO_TARGET else "  MISSED"
            jls = f"{c['jpegls_ratio']:.4f}" if "jpegls_ratio" in c else "-"
            label = f"{name} ({wire['instances']} inst.)"
            lines.append(
                f"{label:<18}{_mb(wire['raw_bytes']):>8}{wire['wire_ratio']:>13.4f}"
                f"{c.get('bundle_ratio', float('nan')):>8.4f}{jls:>15}{target:>9}{mark}"
            )
        lines.append(
            "  on the wire: every byte the proxy delivered to the hub (HTTP, manifest, bundles,"
            " commit);"
        )
        lines.append(
            "  codec: telerad.core.wire.write_bundle; JPEG-LS files: pydicom JPEGLSLossless."
        )
    if "badlink" in results:
        b = results["badlink"]
        ideal = b["ideal_s"]
        lines += [
            "",
            f"Time over a bad link: {cfg['bad_link_bps'] / 1e6:g} Mbit/s, "
            f"{cfg['latency_s'] * 1000:.0f} ms one way ({2 * cfg['latency_s'] * 1000:.0f} ms RTT),"
            f" CT {b['instances']} slices, {_mb(b['raw_bytes'])} MB raw",
            f"ideal = JPEG-LS lossless bytes ({_mb(b['jpegls_bytes'])} MB) / link rate"
            f" = {ideal:.1f} s",
            f"{'variant':<46}{'seconds':>9}{'x ideal':>9}{'wire MB':>9}",
        ]
        rows: list[tuple[str, float, int]] = []
        t = b.get("telerad")
        if t is not None:
            quiet = cfg["quiet_period_s"]
            rows.append(
                ("telerad: first C-STORE -> last instance held", t["held_s"], t["wire_bytes_held"])
            )
            rows.append(
                (
                    f"telerad: ... -> committed (quiet period {quiet:g} s)",
                    t["committed_s"],
                    t["wire_bytes_total"],
                )
            )
        for key, label in (
            ("cstore_raw", "C-STORE raw files (storescu -> storescp)"),
            ("cstore_jpegls", "C-STORE JPEG-LS files (storescu -> storescp)"),
        ):
            if key in b:
                rows.append((label, b[key]["seconds"], b[key]["wire_bytes"]))
        for label, secs, wire in rows:
            lines.append(f"{label:<46}{secs:>9.1f}{secs / ideal:>9.3f}{_mb(wire):>9}")
        if t is not None:
            verdict = "ok" if t["held_s"] / ideal <= TIME_TARGET else "MISSED"
            lines.append(f"  target: last instance held <= {TIME_TARGET:.2f} x ideal: {verdict}")
            lines.append(
                f"  telerad timeline: first byte on the link at {t['first_byte_s']} s, link busy"
                f" {t['link_busy_s']} s, idle {t['link_idle_s']} s (gaps >= {GAP_MIN_S} s:"
                f" {len(t['gaps'])}, {t['gaps_total_s']} s), {len(t['bundles'])} bundles"
                f" ({', '.join(str(x['instances']) for x in t['bundles'])} instances),"
                f" {t['rate_while_sending_bps'] / 1e6:.3f} Mbit/s while sending"
            )
            if t["boundaries"]:
                keys = ("unpack", "response", "pack", "create", "total")
                lines.append(
                    "  link idle between bundles (s): "
                    + f"{'at':>7}"
                    + "".join(f"{k:>10}" for k in keys)
                )
                for bnd in t["boundaries"]:
                    lines.append(
                        f"{'':<32}{bnd['at_s']:>7.1f}" + "".join(f"{bnd[k]:>10.2f}" for k in keys)
                    )
    if "stat" in results:
        s = results["stat"]
        verdict = "ok" if s["within_target"] else "MISSED"
        lines += [
            "",
            f"STAT pre-emption: {s['link_bps'] / 1e6:g} Mbit/s, {cfg['latency_s'] * 1000:.0f} ms"
            f" one way; STAT CR ({_mb(s['stat_raw_bytes'])} MB raw) pushed behind"
            f" {s['routine_studies']} routine CT studies ({_mb(s['routine_raw_bytes'])} MB raw,"
            f" {s['routine_instances']} instances)",
            f"{'':<46}{'seconds':>9}",
            f"{'STAT CR durable at gateway -> held at hub':<46}{s['latency_s']:>9.1f}",
            f"{'its own transfer time (bundle bytes / rate)':<46}{s['own_transfer_s']:>9.1f}",
            f"{'limit: own transfer + 10 s':<46}{s['limit_s']:>9.1f}   {verdict}",
            f"  routine bytes delivered before the STAT push: {_mb(s['bytes_up_before_stat'])} MB;"
            f" queued on the loopback hop into the link at the push:"
            f" {_queued(s['loopback_queue_bytes_before'])}",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _terminate_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.wire",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="30 CT slices, ~50 MB backlog: a ~3 minute check"
    )
    parser.add_argument("--slices", type=int, help="CT slices (default 120, --quick 30)")
    parser.add_argument(
        "--backlog-mb", type=float, help="routine backlog for the STAT run (default 200)"
    )
    parser.add_argument(
        "--stat-mbps",
        type=float,
        default=STAT_LINK_BPS / 1e6,
        help=f"link rate for the STAT run (default {STAT_LINK_BPS / 1e6:g})",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra gateway setting for experiments, e.g. TELERAD_BUNDLE_MAX_MB=64",
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, data)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}")
    if not dcmtk_available():
        raise SystemExit("DCMTK storescu/storescp are needed (apt-get install dcmtk)")
    slices = args.slices or (30 if args.quick else 120)
    backlog_mb = args.backlog_mb or (50.0 if args.quick else 200.0)
    env = dict(item.split("=", 1) for item in args.gateway_env)
    _terminate_on_sigterm()

    results: dict[str, Any] = {
        "config": {
            "quick": args.quick,
            "ct_slices": slices,
            "bad_link_bps": BAD_LINK_BPS,
            "stat_link_bps": args.stat_mbps * 1e6,
            "latency_s": LATENCY_S,
            "quiet_period_s": QUIET_PERIOD_S,
            "backlog_mb": backlog_mb,
            "gateway_env": env,
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_at_start": machine_load(),
        }
    }
    started = time.monotonic()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work_ctx: contextlib.AbstractContextManager[str] = contextlib.nullcontext(str(args.keep))
    else:
        work_ctx = tempfile.TemporaryDirectory(prefix="telerad-bench-wire-")
    try:
        with work_ctx as work_name:
            work = Path(work_name)
            run(work, sections, slices, backlog_mb, args.stat_mbps * 1e6, env, results)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["config"]["load_at_end"] = machine_load()
    print(render(results))
    load = ", ".join(
        f"{when}: "
        + " ".join(f"{k} {v:g}" for k, v in results["config"][f"load_at_{when}"].items())
        for when in ("start", "end")
    )
    print(f"\n(total {results['elapsed_s']:.0f} s; machine load {load})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


def run(
    work: Path,
    sections: Sequence[str],
    slices: int,
    backlog_mb: float,
    stat_bps: float,
    env: dict[str, str],
    results: dict[str, Any],
) -> None:
    log(f"generating samples: CT {slices} slices + CR")
    paths = generate_samples(work / "samples", ct_slices=slices)
    ct = load_study("CT", [p for p in paths if p.parent.name.startswith("ct")])
    cr = load_study("CR", [p for p in paths if p.parent.name.startswith("cr")])
    log("measuring the codec and making JPEG-LS copies")
    results["codec"] = {
        "CT": measure_codec(ct, work / "jpegls" / "ct"),
        "CR": measure_codec(cr, work / "jpegls" / "cr"),
    }

    if "ratio" in sections:
        log("wire ratio: gateway -> unlimited proxy -> hub")
        results["ratio"] = run_wire_ratio(work, [ct, cr], env)

    if "badlink" in sections or "peers" in sections:
        rate = BAD_LINK_BPS
        ideal = ct.jpegls_bytes * 8 / rate
        badlink: dict[str, Any] = {
            "instances": ct.count,
            "raw_bytes": ct.raw_bytes,
            "jpegls_bytes": ct.jpegls_bytes,
            "bundle_bytes": ct.bundle_bytes,
            "ideal_s": round(ideal, 2),
        }
        results["badlink"] = badlink
        if "badlink" in sections:
            log(f"bad link, telerad (ideal {ideal:.0f} s)")
            telerad = run_telerad_bad_link(work, ct, rate, env)
            log(f"telerad held after {telerad['held_s']} s ({telerad['held_s'] / ideal:.2f}x)")
            badlink["telerad"] = telerad
        if "peers" in sections:
            log("bad link, C-STORE of the raw files")
            badlink["cstore_raw"] = run_cstore_peer(work, "cstore-raw", ct.files, rate)
            log(f"raw C-STORE: {badlink['cstore_raw']['seconds']} s")
            log("bad link, C-STORE of the JPEG-LS files")
            badlink["cstore_jpegls"] = run_cstore_peer(work, "cstore-jpegls", ct.jpegls_files, rate)
            log(f"JPEG-LS C-STORE: {badlink['cstore_jpegls']['seconds']} s")

    if "stat" in sections:
        copies = max(1, round(backlog_mb * 1e6 / ct.raw_bytes))
        log(f"STAT: {copies} routine CT copies (~{copies * ct.raw_bytes / 1e6:.0f} MB raw)")
        routine = [
            load_study(
                f"routine-{i}",
                restamp(ct.files, work / "routine" / str(i), salt=f"bench-wire-routine-{i}"),
            )
            for i in range(copies)
        ]
        stat_path = make_cr(work / "stat", seed=DEFAULT_SEED + 1, priority="STAT")
        stat = load_study("STAT CR", [stat_path])
        measure_codec(stat, None)
        # Start the STAT push well into the backlog (past the first, partial bundle).
        start_after = min(8_000_000, sum(s.raw_bytes for s in routine) // 8)
        results["stat"] = run_stat(work, routine, stat, stat_bps, env, start_after)
        log(f"STAT held {results['stat']['latency_s']} s after durable")
        for i in range(copies):
            shutil.rmtree(work / "routine" / str(i), ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
