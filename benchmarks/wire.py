"""Wire benchmark: a station's studies over a slow, distant link, with the default settings.

Every telerad process here runs with its **default configuration** (no quiet-period, retry or
disk-reserve overrides; only ports and bind addresses are set): the defaults are the
product, and a STAT path once measured with a 2 s quiet period hid a 60 s wait. The link is
a :class:`FaultProxy` at 2 Mbit/s, 150 ms one way (300 ms RTT), with a router-sized queue of
~0.5 s of link time (``buffer_chunks``). Questions, each against a same-run reference:

1. **STAT on the worklist** (issue 9, section 1): >= 150 MB (raw) of routine CT is pushed
   into the gateway with DCMTK ``storescu``; once its bundles cross the link, a STAT chest CR
   (RequestedProcedurePriority STAT) is pushed in one association, released normally. The
   clock runs from that push's start to the CR durable at the gateway, held at the hub,
   committed at the hub and **on the hub's worklist** (its row in the worklist's ``studies``
   table). Target: on the worklist <= its own transfer time (bundle bytes / link rate) + 10 s.
   The run stops there and reports how much of the CT backlog was still queued.
2. **30-slice CT commit ratio**: a 30-slice CT pushed alone (one association): first C-STORE
   to committed at the hub (and on the worklist), / its JPEG-LS transfer time (pydicom
   JPEG-LS lossless bytes / link rate). Target <= 1.15x. Peers through the same link: DCMTK
   ``storescu`` -> ``storescp`` with the raw files and with JPEG-LS copies.
3. **Wire ratio**: bytes that reach the hub / raw DICOM bytes (an unlimited proxy counts
   every byte: HTTP, manifest, bundles, commit), next to the codec's and pydicom's JPEG-LS
   ratios. Target: CT <= 0.45.

Gateway and hub run as separate processes (``telerad ... serve``), the proxy in this process.
Everything listens on 127.0.0.1 and is stopped and deleted at the end, also on failure or
Ctrl-C. The default run (30-slice CT, ~158 MB backlog) takes about 3.5 minutes, mostly the
C-STORE peers; ``--quick`` (~63 MB backlog, no raw C-STORE peer) about 2.

    python -m benchmarks.wire [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
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

from dicom_gateway.station.settings import GatewaySettings
from reading_queue.settings import HubSettings
from sample_studies.generate import DEFAULT_SEED, generate_samples, make_cr, restamp
from telerad.core.wire import BundleEntry, write_bundle
from tests.support import faultproxy
from tests.support.faultproxy import FaultProxy
from tests.support.peers import StoreSCP, dcmtk_available, storescu
from tests.support.telerad_procs import GatewayProcess, HubProcess

SECTIONS = ("ratio", "badlink", "peers", "stat")

LINK_BPS = 2_000_000  # both questions: 2 Mbit/s ...
LATENCY_S = 0.150  # ... 150 ms one way: 300 ms round trip
ROUTER_BUFFER_S = 0.5  # the proxy's queue: about this much link time (a router-sized buffer)
RATIO_TARGET = 0.45
COMMIT_TARGET = 1.15  # 30-slice CT: first C-STORE -> committed, x its JPEG-LS transfer time
STAT_ALLOWANCE_S = 10.0  # STAT on the worklist <= own transfer time + this
STAT_DEADLINE_S = 240.0  # long enough to see a 60 s quiet-period fallback if it happened
POLL_S = 0.05
SAMPLE_S = 0.05
GAP_MIN_S = 0.2  # link idle at least this long counts as a gap in the timeline

#: Environment the test helpers set for speed (tests/support/telerad_procs.py): removed, so
#: both processes run with the product's defaults. Only ports and bind addresses stay (and
#: TELERAD_HTTP_PORT=-1: the gateway's status port off, so parallel runs cannot collide).
_TEST_OVERRIDES = ("TELERAD_QUIET_PERIOD_S", "TELERAD_DISK_RESERVE_MB", "TELERAD_RETRY_MAX_S")
_KEPT = ("TELERAD_HTTP_PORT", "TELERAD_HTTP_HOST", "TELERAD_DICOM_HOST")


def router_chunks(rate_bps: float | None, buffer_s: float = ROUTER_BUFFER_S) -> int:
    """``buffer_chunks`` for a FaultProxy queue of ~``buffer_s`` of link time.

    The proxy reads at most one chunk of ``rate * _CHUNK_SECONDS`` bytes (1-64 KB) per
    direction at a time: 5,000 B = 20 ms at 2 Mbit/s, so 0.5 s is 25 chunks. (The queue holds
    chunks already serialised, waiting out the one-way delay: 150 ms = 7.5 chunks, so 25 does
    not cap the rate.) Without a rate the chunk is 64 KB and the same count is used.
    """
    if rate_bps is None:
        return max(1, round(buffer_s / faultproxy._CHUNK_SECONDS))
    chunk = min(
        faultproxy._MAX_CHUNK, max(faultproxy._MIN_CHUNK, rate_bps / 8 * faultproxy._CHUNK_SECONDS)
    )
    return max(1, round(buffer_s * rate_bps / 8 / chunk))


def default_settings() -> dict[str, Any]:
    """The defaults the processes run with (read from the settings classes, not copied)."""
    gw = GatewaySettings.model_fields
    hub = HubSettings.model_fields
    return {
        "gateway": {
            k: gw[k].default
            for k in (
                "quiet_period_s",
                "release_settle_s",
                "bundle_max_mb",
                "chunk_kb",
                "retry_max_s",
                "disk_reserve_mb",
            )
        },
        "hub": {k: hub[k].default for k in ("queue_interval_s", "assignment_mode")},
    }


def _product_env(proc: Any, extra: dict[str, str]) -> None:
    """Strip the test helpers' overrides (and any TELERAD_* of this shell) from a process's
    environment before it starts; ``extra`` (``--gateway-env``) is applied on top."""
    proc.env = {k: v for k, v in proc.env.items() if not k.startswith("TELERAD_") or k in _KEPT}
    proc.env.update(extra)


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

    def on_worklist(self, study_uid: str) -> tuple[float, str, int] | None:
        """The study's row in the worklist's ``studies`` table: (received_at, state, priority)."""
        row = self.conn.execute(
            "SELECT received_at, state, priority FROM studies WHERE study_uid = ?", (study_uid,)
        ).fetchone()
        return None if row is None else (float(row[0]), str(row[1]), int(row[2]))

    def held_counts(self, study_uids: Sequence[str]) -> int:
        marks = ",".join("?" * len(study_uids))
        row = self.conn.execute(
            f"SELECT count(*) FROM hub_instances WHERE study_uid IN ({marks})", [*study_uids]
        ).fetchone()
        return int(row[0])

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
_HUB_EVENTS = (
    ("hub-held", re.compile(r"upload \S+ from \S+: (\d+) instances held for study (?P<uid>\S+)")),
    ("hub-committed", re.compile(r"study (?P<uid>\S+) from \S+ committed: (\d+) instances")),
    ("hub-worklist", re.compile(r"study (?P<uid>\S+) from \S+ on the worklist: (.*)$")),
)
_EVENTS = (
    (
        "packed",
        re.compile(r"packed (\d+) instances of (?P<uid>\S+): (\d+) raw -> (\d+) wire bytes"),
    ),
    ("held", re.compile(r"bundle (\d+) of (?P<uid>\S+) held by the hub \((\d+) instances\)")),
    ("pre-empted", re.compile(r"bundle (\d+) of (?P<uid>\S+) pre-empted at (\d+)/(\d+)")),
    ("committed", re.compile(r"study (?P<uid>\S+) committed at hub")),
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
                uid_group = pattern.groupindex.get("uid")
                fields = [g for i, g in enumerate(found.groups(), 1) if i != uid_group]
                event = {"t": stamp, "kind": kind, "fields": fields}
                if uid_group is not None:
                    event["study"] = found.group("uid")
                events.append(event)
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

    def _gateway_query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(str(self.gateway.data_dir / "gateway.sqlite3"), timeout=10)
        try:
            return list(conn.execute(sql, [*params]).fetchall())
        finally:
            conn.close()

    def gateway_received_at(self, sop_uid: str) -> float | None:
        rows = self._gateway_query(
            "SELECT received_at FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
        )
        return float(rows[0][0]) if rows else None

    def gateway_released_at(self, study_uid: str) -> float | None:
        rows = self._gateway_query(
            "SELECT released_at FROM studies WHERE study_uid = ?", (study_uid,)
        )
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def gateway_backlog(self, study_uids: Sequence[str]) -> dict[str, Any]:
        """Where these studies' instances are at the gateway (for the hub destination), and
        the open bundles' bytes not yet accepted by the hub."""
        marks = ",".join("?" * len(study_uids))
        states = {
            str(state): {"instances": int(n), "raw_bytes": int(size or 0)}
            for state, n, size in self._gateway_query(
                "SELECT d.state, count(*), sum(i.size) FROM deliveries d JOIN instances i "
                "ON i.sop_instance_uid = d.sop_instance_uid "
                f"WHERE d.study_uid IN ({marks}) GROUP BY d.state",
                study_uids,
            )
        }
        n, length, offset = self._gateway_query(
            "SELECT count(*), coalesce(sum(length), 0), coalesce(sum(offset), 0) FROM bundles "
            f"WHERE study_uid IN ({marks})",
            study_uids,
        )[0]
        return {
            "states": states,
            "open_bundles": int(n),
            "open_bundle_bytes_left": int(length) - int(offset),
        }

    def events(self, since: float) -> list[dict[str, Any]]:
        """Gateway forwarding events and the hub's intake/worklist events, by time."""
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
    """Hub process, proxy (the link) and gateway process, all with default settings;
    all stopped on exit."""
    with contextlib.ExitStack() as stack:
        hub = HubProcess(work / f"{name}-hub")
        _product_env(hub, {})
        stack.callback(hub.kill9)  # also covers a start that timed out with the process alive
        stack.enter_context(hub)
        token = hub.add_station(f"bench-{name}")
        proxy = stack.enter_context(
            FaultProxy("127.0.0.1", hub.http_port, buffer_chunks=router_chunks(bandwidth_bps))
        )
        proxy.bandwidth_bps = bandwidth_bps
        proxy.latency_s = latency_s
        gateway = GatewayProcess(
            work / f"{name}-gw",
            hub_url=f"http://127.0.0.1:{proxy.port}",
            token=token,
            aet="TELERAD_GW",
        )
        _product_env(gateway, gateway_env)
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


def _milestones(pair: Pair, study: Study, deadline_s: float, what: str) -> dict[str, float]:
    """Poll the hub until the study is held (every instance), committed and on the worklist;
    the wall time each was first seen (50 ms polls)."""
    seen: dict[str, float] = {}
    end = time.monotonic() + deadline_s
    while "worklist" not in seen:
        now = time.time()
        if "held" not in seen and pair.db.all_held(study.study_uid, study.count):
            seen["held"] = now
        if "held" in seen and "committed" not in seen and pair.db.committed_at(study.study_uid):
            seen["committed"] = now
        if "committed" in seen and pair.db.on_worklist(study.study_uid):
            seen["worklist"] = now
        if time.monotonic() > end:
            raise TimeoutError(
                f"timed out after {deadline_s:.0f} s waiting for {what} "
                f"(seen so far: {', '.join(seen) or 'nothing'})"
            )
        time.sleep(POLL_S)
    return seen


def run_telerad_bad_link(
    work: Path, study: Study, rate_bps: float, env: dict[str, str]
) -> dict[str, Any]:
    """storescu -> gateway -> proxy (slow, far) -> hub: held, committed, on the worklist."""
    with (
        telerad_pair(
            work, "badlink", bandwidth_bps=rate_bps, latency_s=LATENCY_S, gateway_env=env
        ) as pair,
        LinkSampler(pair.proxy) as sampler,
    ):
        up0 = pair.proxy.bytes_up
        load = machine_load()
        t0 = time.time()
        pair.push(study.files)
        t_pushed = time.time()
        deadline = STAT_DEADLINE_S + 4 * study.raw_bytes * 8 / rate_bps
        seen = _milestones(pair, study, deadline, "the CT held, committed, on the worklist")
        t_held = seen["held"]
        up_held = sampler_bytes_at(sampler, t_held, pair.proxy.bytes_up) - up0
        time.sleep(0.5)
        up_total = pair.proxy.bytes_up - up0
        last_received = pair.db.held(study.study_uid)[1]
        committed_at = pair.db.committed_at(study.study_uid)
        worklist_row = pair.db.on_worklist(study.study_uid)
        first_byte = sampler.first_up_after(t0, up0)
        last_byte = sampler.last_up_change(t_held)
        events = pair.events(t0)
        gaps = sampler.gaps(first_byte or t0, t_held)
        boundaries = bundle_boundaries(events, gaps)
        first_received = pair.gateway_received_at(study.sop_uids[0])
        last_durable = pair.gateway_received_at(study.sop_uids[-1])
        released_at = pair.gateway_released_at(study.study_uid)
    busy_s = up_held * 8 / rate_bps
    held_s = t_held - t0
    span = (last_byte or t_held) - (first_byte or t0)
    idle_inside = sum(g["seconds"] for g in gaps if g["start"] < (last_byte or t_held))
    sending_rate = up_held * 8 / max(span - idle_inside, 1e-3)
    bundles = [e for e in events if e["kind"] == "packed"]

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 2)

    return {
        "load": load,
        "held_s": round(held_s, 2),
        "committed_s": round(seen["committed"] - t0, 2),
        "worklist_s": round(seen["worklist"] - t0, 2),
        "hub_committed_at_s": rel(committed_at),
        "hub_worklist_received_at_s": rel(worklist_row[0]) if worklist_row else None,
        "hub_last_received_at_s": rel(float(last_received)) if last_received else None,
        "push_s": round(t_pushed - t0, 2),
        "first_instance_durable_s": rel(first_received),
        "last_instance_durable_s": rel(last_durable),
        "released_at_s": rel(released_at),
        "complete_by_release_at_s": rel(
            released_at + default_settings()["gateway"]["release_settle_s"]
        )
        if released_at
        else None,
        "first_byte_s": rel(first_byte),
        "last_byte_s": rel(last_byte),
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


def sampler_bytes_at(sampler: LinkSampler, t: float, fallback: int) -> int:
    """Upstream bytes delivered by time ``t`` (last sample at or before it)."""
    value: int | None = None
    for ts, up, _ in list(sampler.samples):
        if ts > t:
            break
        value = up
    return fallback if value is None else value


def run_cstore_peer(
    work: Path, name: str, files: Sequence[Path], rate_bps: float
) -> dict[str, Any]:
    """DCMTK storescu -> proxy (same link) -> storescp; storescu waits for every response."""
    with (
        StoreSCP(workdir=work / f"{name}-storescp") as scp,
        FaultProxy("127.0.0.1", scp.port, buffer_chunks=router_chunks(rate_bps)) as proxy,
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
    """A STAT CR pushed while a routine backlog is crossing the link: until on the worklist."""
    routine_uids = [s.study_uid for s in routine]
    labels = {s.study_uid: "CT" for s in routine} | {stat.study_uid: "STAT"}
    with (
        telerad_pair(
            work, "stat", bandwidth_bps=rate_bps, latency_s=LATENCY_S, gateway_env=env
        ) as pair,
        LinkSampler(pair.proxy) as sampler,
    ):
        t0 = time.time()
        pair.push([p for s in routine for p in s.files])
        t_routine = time.time()
        log(f"routine backlog pushed in {t_routine - t0:.1f} s; waiting for bundles to move")
        wait_for(
            lambda: pair.proxy.bytes_up >= start_after_bytes,
            120 + start_after_bytes * 8 / rate_bps,
            "routine forwarding under way",
        )
        queue_before = socket_queues(pair.proxy.port)
        backlog_before = pair.gateway_backlog(routine_uids)
        up_at_stat = pair.proxy.bytes_up
        load = machine_load()
        t_push = time.time()
        pair.push(stat.files)
        t_pushed = time.time()
        durable = pair.gateway_received_at(stat.sop_uids[0])
        if durable is None:
            raise RuntimeError("the STAT CR is not recorded at the gateway")
        queue_after = socket_queues(pair.proxy.port)
        seen = _milestones(pair, stat, STAT_DEADLINE_S, "the STAT CR on the worklist")
        t_worklist = seen["worklist"]
        # The moment it is on the worklist: how much routine CT is still behind?
        backlog_at = pair.gateway_backlog(routine_uids)
        routine_held = pair.db.held_counts(routine_uids)
        routine_committed = sum(1 for u in routine_uids if pair.db.committed_at(u))
        up_at_worklist = pair.proxy.bytes_up
        received_at = pair.db.instance_received_at(stat.sop_uids[0])
        committed_at = pair.db.committed_at(stat.study_uid)
        worklist_row = pair.db.on_worklist(stat.study_uid)
        released_at = pair.gateway_released_at(stat.study_uid)
        time.sleep(0.3)  # the last log lines
        events = pair.events(t0)
        gaps = sampler.gaps(t_push, t_worklist)
        pair.gateway.kill9()  # the rest of the backlog is of no interest: stop at once
    own_s = stat.bundle_bytes * 8 / rate_bps
    limit = own_s + STAT_ALLOWANCE_S
    worklist_s = t_worklist - t_push
    settle = default_settings()["gateway"]["release_settle_s"]

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t_push, 2)

    timeline = [
        {
            "t_s": round(e["t"] - t_push, 3),
            "kind": e["kind"],
            "study": labels.get(e.get("study", ""), "?") if "study" in e else "",
            "fields": e["fields"],
        }
        for e in events
        if t_push - 0.5 <= e["t"] <= t_worklist + 0.5
    ]
    total_raw = sum(s.raw_bytes for s in routine)
    states = backlog_at["states"]
    not_uploaded_raw = sum(states.get(k, {}).get("raw_bytes", 0) for k in ("pending", "bundled"))
    return {
        "load": load,
        "link_bps": rate_bps,
        "routine_studies": len(routine),
        "routine_instances": sum(s.count for s in routine),
        "routine_raw_bytes": total_raw,
        "routine_push_s": round(t_routine - t0, 2),
        "stat_pushed_at_s": round(t_push - t0, 2),
        "stat_cstore_s": round(t_pushed - t_push, 3),
        "bytes_up_before_stat": up_at_stat,
        "bytes_up_push_to_worklist": up_at_worklist - up_at_stat,
        "stat_bundle_bytes": stat.bundle_bytes,
        "stat_raw_bytes": stat.raw_bytes,
        "own_transfer_s": round(own_s, 2),
        "limit_s": round(limit, 2),
        "durable_s": rel(durable),
        "released_s": rel(released_at),
        "complete_by_release_s": rel(released_at + settle) if released_at else None,
        "held_s": rel(seen["held"]),
        "hub_received_at_s": rel(received_at),
        "committed_s": rel(seen["committed"]),
        "hub_committed_at_s": rel(committed_at),
        "worklist_s": round(worklist_s, 2),
        "hub_worklist_received_at_s": rel(worklist_row[0]) if worklist_row else None,
        "worklist_priority": worklist_row[2] if worklist_row else None,
        "margin_s": round(limit - worklist_s, 2),
        "within_target": worklist_s <= limit,
        "routine_backlog_at_stat": backlog_before,
        "routine_backlog_at_worklist": backlog_at,
        "routine_raw_not_uploaded_at_worklist": not_uploaded_raw,
        "routine_share_not_uploaded_at_worklist": round(not_uploaded_raw / total_raw, 3),
        "routine_instances_held_at_hub_at_worklist": routine_held,
        "routine_studies_committed_at_worklist": routine_committed,
        "loopback_queue_bytes_before": queue_before,
        "loopback_queue_bytes_after": queue_after,
        "gaps": [
            {"start_s": round(g["start"] - t_push, 2), "seconds": round(g["seconds"], 2)}
            for g in gaps
        ],
        "events": timeline,
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


def _load(load: dict[str, float]) -> str:
    return " ".join(f"{k} {v:g}" for k, v in load.items())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    cfg = results["config"]
    codec = results.get("codec", {})
    d = cfg["defaults"]
    lines += [
        "Configuration: gateway and hub with their DEFAULT settings"
        + (f" plus --gateway-env {cfg['gateway_env']}" if cfg["gateway_env"] else "")
        + ":",
        "  gateway " + ", ".join(f"{k} {v}" for k, v in d["gateway"].items()),
        "  hub " + ", ".join(f"{k} {v}" for k, v in d["hub"].items()),
        f"  link {cfg['link_bps'] / 1e6:g} Mbit/s, {cfg['latency_s'] * 1000:.0f} ms one way,"
        f" proxy queue {cfg['buffer_chunks']} chunks of {cfg['chunk_bytes']} B"
        f" (~{cfg['buffer_chunks'] * cfg['chunk_bytes'] * 8 / cfg['link_bps']:.2f} s of link)",
    ]
    if "stat" in results:
        s = results["stat"]
        verdict = "ok" if s["within_target"] else f"MISSED by {-s['margin_s']:.1f} s"
        b = s["routine_backlog_at_worklist"]
        lines += [
            "",
            f"STAT on the worklist: STAT chest CR ({_mb(s['stat_raw_bytes'])} MB raw,"
            f" {_mb(s['stat_bundle_bytes'])} MB bundle) pushed behind {s['routine_studies']}"
            f" routine CT studies ({_mb(s['routine_raw_bytes'])} MB raw,"
            f" {s['routine_instances']} instances), {_mb(s['bytes_up_before_stat'])} MB of it"
            " already across the link",
            f"{'seconds from the STAT push (storescu start)':<52}{'':>4}",
        ]
        for label, key in (
            ("CR durable at the gateway", "durable_s"),
            ("association released (gateway)", "released_s"),
            ("complete by release (+ release_settle_s)", "complete_by_release_s"),
            ("CR held at the hub (poll)", "held_s"),
            ("committed at the hub (poll)", "committed_s"),
            ("on the hub's worklist (poll)", "worklist_s"),
        ):
            lines.append(f"  {label:<50}{_fmt(s[key]):>8}")
        lines += [
            f"  {'own transfer time (bundle bytes / link rate)':<50}{s['own_transfer_s']:>8.2f}",
            f"  {'limit: own transfer + 10 s':<50}{s['limit_s']:>8.2f}   {verdict}"
            f" (margin {s['margin_s']:+.1f} s)",
            f"  routine CT at that moment: {_mb(s['routine_raw_not_uploaded_at_worklist'])} MB"
            f" raw ({100 * s['routine_share_not_uploaded_at_worklist']:.0f} %) not yet"
            f" uploaded, {b['open_bundles']} open bundle(s) with"
            f" {_mb(b['open_bundle_bytes_left'])} MB left;"
            f" {s['routine_instances_held_at_hub_at_worklist']} of {s['routine_instances']}"
            f" instances held at the hub, {s['routine_studies_committed_at_worklist']} studies"
            " committed",
            "  loopback queue into the link at the push: "
            + _queued(s["loopback_queue_bytes_before"]),
            f"  machine load at the push: {_load(s['load'])}",
            "  timeline (s from the STAT push):",
        ]
        for e in s["events"]:
            lines.append(
                f"    {e['t_s']:>8.2f}  {e['kind']:<14}{e['study']:<6}{' '.join(e['fields'])}"
            )
        if s["gaps"]:
            lines.append(
                "  link idle >= 0.2 s: "
                + ", ".join(f"{g['seconds']:.2f} s at {g['start_s']:.2f}" for g in s["gaps"])
            )
    if "badlink" in results:
        b = results["badlink"]
        ideal = b["ideal_s"]
        lines += [
            "",
            f"CT commit ratio: {b['instances']} slices, {_mb(b['raw_bytes'])} MB raw, pushed"
            " alone (one association)",
            f"JPEG-LS transfer time = JPEG-LS lossless bytes ({_mb(b['jpegls_bytes'])} MB) / link"
            f" rate = {ideal:.2f} s",
            f"{'variant':<50}{'seconds':>9}{'x ideal':>9}{'wire MB':>9}",
        ]
        rows: list[tuple[str, float, int | None]] = []
        t = b.get("telerad")
        if t is not None:
            rows += [
                ("telerad: first C-STORE -> last instance held", t["held_s"], t["wire_bytes_held"]),
                ("telerad: first C-STORE -> committed at the hub", t["committed_s"], None),
                (
                    "telerad: first C-STORE -> on the worklist",
                    t["worklist_s"],
                    t["wire_bytes_total"],
                ),
            ]
        for key, label in (
            ("cstore_raw", "C-STORE raw files (storescu -> storescp)"),
            ("cstore_jpegls", "C-STORE JPEG-LS files (storescu -> storescp)"),
        ):
            if key in b:
                rows.append((label, b[key]["seconds"], b[key]["wire_bytes"]))
        for label, secs, wire in rows:
            w = _mb(wire) if wire is not None else ""
            lines.append(f"{label:<50}{secs:>9.2f}{secs / ideal:>9.3f}{w:>9}")
        if t is not None:
            ratio = t["committed_s"] / ideal
            verdict = (
                "ok"
                if ratio <= COMMIT_TARGET
                else (f"MISSED by {t['committed_s'] - COMMIT_TARGET * ideal:.1f} s")
            )
            lines.append(
                f"  target: committed <= {COMMIT_TARGET:.2f} x JPEG-LS transfer time"
                f" ({COMMIT_TARGET * ideal:.1f} s): {ratio:.3f}x {verdict}"
            )
            for key, label in (("cstore_jpegls", "JPEG-LS"), ("cstore_raw", "raw")):
                if key in b:
                    lines.append(
                        f"  telerad committed / C-STORE {label}: "
                        f"{t['committed_s'] / b[key]['seconds']:.3f}"
                        f" ({b[key]['seconds'] / t['committed_s']:.2f}x faster)"
                    )
            lines.append(
                f"  timeline: push {t['push_s']} s, released at {t['released_at_s']} s"
                f" (complete by release at {t['complete_by_release_at_s']} s), first byte on the"
                f" link at {t['first_byte_s']} s, last at {t['last_byte_s']} s, held at"
                f" {t['held_s']} s, committed at {t['committed_s']} s (hub stamp"
                f" {t['hub_committed_at_s']}), on the worklist at {t['worklist_s']} s"
            )
            lines.append(
                f"  link busy {t['link_busy_s']} s, idle {t['link_idle_s']} s before held"
                f" (gaps >= {GAP_MIN_S} s: {len(t['gaps'])}, {t['gaps_total_s']} s),"
                f" {len(t['bundles'])} bundles"
                f" ({', '.join(str(x['instances']) for x in t['bundles'])} instances),"
                f" {t['rate_while_sending_bps'] / 1e6:.3f} Mbit/s while sending;"
                f" load {_load(t['load'])}"
            )
            if t["gaps"]:
                lines.append(
                    "  gaps: "
                    + ", ".join(f"{g['seconds']:.2f} s at {g['start_s']:.2f}" for g in t["gaps"])
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
            " commit); codec: telerad.core.wire.write_bundle; JPEG-LS files: pydicom."
        )
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
        "--quick",
        action="store_true",
        help="~50 MB (4 CT copies) backlog, no raw C-STORE peer: a ~2 minute check",
    )
    parser.add_argument("--slices", type=int, default=30, help="CT slices (default 30)")
    parser.add_argument(
        "--backlog-mb",
        type=float,
        help="routine CT backlog for the STAT run, raw MB (default 150, --quick 50)",
    )
    parser.add_argument(
        "--stat-after-mb",
        type=float,
        default=2.0,
        help="push the STAT once this many MB crossed the link (default 2)",
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
        help="extra gateway setting for experiments (not the defaults any more: reported)",
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
    backlog_mb = args.backlog_mb or (50.0 if args.quick else 150.0)
    env = dict(item.split("=", 1) for item in args.gateway_env)
    _terminate_on_sigterm()

    chunks = router_chunks(LINK_BPS)
    results: dict[str, Any] = {
        "config": {
            "quick": args.quick,
            "ct_slices": args.slices,
            "link_bps": LINK_BPS,
            "latency_s": LATENCY_S,
            "buffer_chunks": chunks,
            "chunk_bytes": int(LINK_BPS / 8 * faultproxy._CHUNK_SECONDS),
            "backlog_mb": backlog_mb,
            "stat_after_mb": args.stat_after_mb,
            "defaults": default_settings(),
            "removed_test_overrides": list(_TEST_OVERRIDES),
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
            run(work, sections, args, backlog_mb, env, results)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    except Exception as exc:
        # Keep what was measured: a later section failing must not lose an earlier one.
        results["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        log(f"failed: {results['error'][:500]}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        with contextlib.suppress(Exception):
            print(render(results))
        raise
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["config"]["load_at_end"] = machine_load()
    print(render(results))
    load = ", ".join(
        f"{when}: " + _load(results["config"][f"load_at_{when}"]) for when in ("start", "end")
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
    args: argparse.Namespace,
    backlog_mb: float,
    env: dict[str, str],
    results: dict[str, Any],
) -> None:
    log(f"generating samples: CT {args.slices} slices + CR")
    paths = generate_samples(work / "samples", ct_slices=args.slices)
    ct = load_study("CT", [p for p in paths if p.parent.name.startswith("ct")])
    cr = load_study("CR", [p for p in paths if p.parent.name.startswith("cr")])
    log("measuring the codec and making JPEG-LS copies")
    results["codec"] = {
        "CT": measure_codec(ct, work / "jpegls" / "ct"),
        "CR": measure_codec(cr, work / "jpegls" / "cr"),
    }
    rate = LINK_BPS

    if "stat" in sections:
        copies = max(1, math.ceil(backlog_mb * 1e6 / ct.raw_bytes))
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
        results["stat"] = run_stat(work, routine, stat, rate, env, int(args.stat_after_mb * 1e6))
        s = results["stat"]
        log(f"STAT on the worklist {s['worklist_s']} s after the push (limit {s['limit_s']} s)")
        for i in range(copies):
            shutil.rmtree(work / "routine" / str(i), ignore_errors=True)

    if "badlink" in sections or "peers" in sections:
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
            log(f"CT commit ratio, telerad (JPEG-LS transfer time {ideal:.1f} s)")
            telerad = run_telerad_bad_link(work, ct, rate, env)
            log(
                f"telerad committed after {telerad['committed_s']} s"
                f" ({telerad['committed_s'] / ideal:.3f}x)"
            )
            badlink["telerad"] = telerad
        if "peers" in sections:
            log("bad link, C-STORE of the JPEG-LS files")
            badlink["cstore_jpegls"] = run_cstore_peer(work, "cstore-jpegls", ct.jpegls_files, rate)
            log(f"JPEG-LS C-STORE: {badlink['cstore_jpegls']['seconds']} s")
            if not args.quick:
                log("bad link, C-STORE of the raw files")
                badlink["cstore_raw"] = run_cstore_peer(work, "cstore-raw", ct.files, rate)
                log(f"raw C-STORE: {badlink['cstore_raw']['seconds']} s")

    if "ratio" in sections:
        log("wire ratio: gateway -> unlimited proxy -> hub")
        results["ratio"] = run_wire_ratio(work, [ct, cr], env)


if __name__ == "__main__":
    raise SystemExit(main())
