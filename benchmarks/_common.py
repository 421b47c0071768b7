"""Shared plumbing for the benchmarks: cached sample data, timed storescu pushes, peers' state.

Benchmarks are scripts (``python -m benchmarks.<name>``), never tests. Each compares telerad
with a peer measured in the same run on the same bytes, because absolute numbers on a shared
2-core VM mean little on their own.
"""

from __future__ import annotations

import datetime as _dt
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
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from sample_studies.generate import DEFAULT_SEED, generate_samples, make_ct_series
from tests.support.peers import OrthancServer, StoreSCP, dcmtk_tool, storescu_config
from tests.support.telerad_procs import GatewayProcess

_REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000  # decimal megabytes throughout: gigabit line rate is 125 MB/s raw

CACHE_ENV = "TELERAD_BENCH_CACHE"
_MARKER = "complete.json"


# ---------------------------------------------------------------------------- process hygiene


def sigterm_as_exit() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop the peers and remove temp dirs."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A temporary directory removed on exit, whatever happens inside."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- sample data


def cache_root() -> Path:
    """Where generated benchmark inputs live between runs: never inside the repository."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "telerad-bench"


def _cached(key: str, make: Callable[[Path], list[Path]]) -> list[Path]:
    """Files made once by ``make(dir)``; a marker written last makes half-made sets redo."""
    root = cache_root() / key
    marker = root / _MARKER
    if marker.is_file():
        names = json.loads(marker.read_text())["files"]
        paths = [root / n for n in names]
        if all(p.is_file() for p in paths):
            return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    print(f"generating {key} into {root} (once; cached for later runs)", flush=True)
    paths = make(root)
    marker.write_text(json.dumps({"files": [str(p.relative_to(root)) for p in paths]}))
    print(f"  generated {len(paths)} files in {time.perf_counter() - started:.1f} s", flush=True)
    return paths


def sample_set(ct_slices: int, seed: int = DEFAULT_SEED) -> list[Path]:
    """The demo set: a ``ct_slices`` 512x512 CT and a 2500x2048 chest CR (cached)."""
    return _cached(
        f"samples-ct{ct_slices}-seed{seed}",
        lambda d: generate_samples(d, ct_slices=ct_slices, seed=seed),
    )


def ct_series(slices: int, seed: int = DEFAULT_SEED) -> list[Path]:
    """One 512x512 CT series of ``slices`` files (cached; 1000 slices take ~12 s)."""
    return _cached(f"ct{slices}-seed{seed}", lambda d: make_ct_series(d / "ct", slices, seed=seed))


def total_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


@dataclass(frozen=True)
class InstanceIds:
    sop_uids: frozenset[str]
    study_uids: frozenset[str]


def instance_ids(paths: Iterable[Path]) -> InstanceIds:
    """SOP and Study Instance UIDs of ``paths`` (header only), to check what a peer stored."""
    sops: set[str] = set()
    studies: set[str] = set()
    for p in paths:
        ds = dcmread(
            p, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StudyInstanceUID"]
        )
        sops.add(str(ds.SOPInstanceUID))
        studies.add(str(ds.StudyInstanceUID))
    return InstanceIds(frozenset(sops), frozenset(studies))


# ---------------------------------------------------------------------------- storescu


class PushFailed(RuntimeError):
    """storescu failed or the target did not store everything: the timing is void."""


@dataclass(frozen=True)
class StorescuProfile:
    """A DCMTK association profile proposing exactly the (SOP class, syntax) pairs present.

    Built once, outside any timing: ``tests.support.peers.storescu`` builds it per call by
    reading every file with pydicom, which would be charged to the target.
    """

    config: Path
    name: str

    @classmethod
    def for_files(cls, paths: Sequence[Path], config: Path) -> StorescuProfile:
        return cls(config, storescu_config(paths, config))


def storescu_push(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_aet: str,
    profile: StorescuProfile,
    *,
    timeout_s: float = 600.0,
) -> float:
    """Push ``paths`` in one association with DCMTK storescu; return wall seconds.

    The time covers the whole storescu process: start, association, every C-STORE answered,
    release. ``TCP_NODELAY=1`` as for every DCMTK program (FIELD-NOTES: ~40 ms per instance
    otherwise).
    """
    cmd = [dcmtk_tool("storescu"), "-aec", called_aet, "-aet", "BENCH_SCU", "-nh", "-to", "30"]
    cmd += ["-xf", str(profile.config), profile.name, host, str(port), *map(str, paths)]
    env = dict(os.environ, TCP_NODELAY="1")
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or "E:" in proc.stderr:
        raise PushFailed(f"storescu exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    return elapsed


def flush_page_cache_writes() -> None:
    """``sync``: start each push with no dirty pages left by the previous step.

    Otherwise the kernel writes back the previous push (or the restamped input) while the
    next target fsyncs, and whoever comes next pays for it.
    """
    os.sync()


# ---------------------------------------------------------------------------- targets


class Target(ABC):
    name: str
    host = "127.0.0.1"

    @abstractmethod
    def start(self, root: Path) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @property
    @abstractmethod
    def port(self) -> int: ...

    @property
    @abstractmethod
    def aet(self) -> str: ...

    @property
    @abstractmethod
    def pid(self) -> int:
        """The process that receives (for /proc/<pid>/status)."""

    @abstractmethod
    def stored(self, ids: InstanceIds) -> int:
        """How many of the pushed instances the target holds now."""

    def describe(self) -> str:
        return self.name


class GatewayTarget(Target):
    name = "gateway"

    def __init__(self) -> None:
        self.proc: GatewayProcess | None = None
        self.data_dir = Path()

    def start(self, root: Path) -> None:
        self.data_dir = root / "gateway" / "data"
        # No hub URL: nothing forwards while the benchmark pushes, so only ingest is measured.
        self.proc = GatewayProcess(self.data_dir, hub_url=None, token=None, aet="TELERAD_GW")
        self.proc.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    @property
    def port(self) -> int:
        assert self.proc is not None
        return self.proc.dicom_port

    @property
    def aet(self) -> str:
        return "TELERAD_GW"

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.proc is not None
        return self.proc.proc.pid

    def stored(self, ids: InstanceIds) -> int:
        return gateway_stored(self.data_dir / "gateway.sqlite3", self.data_dir, ids.sop_uids)

    def describe(self) -> str:
        return "gateway (telerad gateway serve, no hub: file fsync + dir fsync + SQLite row)"


class OrthancTarget(Target):
    name = "orthanc"

    def __init__(self) -> None:
        self.server: OrthancServer | None = None

    def start(self, root: Path) -> None:
        # Killed at the end rather than stopped gracefully (~3.5 s): its storage is thrown away.
        self.server = OrthancServer("ORTHANC", workdir=root / "orthanc", graceful_stop=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.dicom_port

    @property
    def aet(self) -> str:
        return "ORTHANC"

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server._process is not None
        return self.server._process.pid

    def stored(self, ids: InstanceIds) -> int:
        assert self.server is not None
        found = 0
        with self.server.client() as client:
            for study in ids.study_uids:
                response = client.post(
                    "/tools/find",
                    json={"Level": "Instance", "Query": {"StudyInstanceUID": study}},
                )
                response.raise_for_status()
                found += len(response.json())
        return found

    def describe(self) -> str:
        return "orthanc (Orthanc 1.10, SyncStorageArea=true, SQLite index, TCP_NODELAY=1)"


class StoreSCPTarget(Target):
    name = "storescp"

    def __init__(self) -> None:
        self.scp: StoreSCP | None = None

    def start(self, root: Path) -> None:
        self.scp = StoreSCP("STORESCP", workdir=root / "storescp")
        self.scp.start()

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()
            self.scp = None

    @property
    def port(self) -> int:
        assert self.scp is not None
        return self.scp.port

    @property
    def aet(self) -> str:
        return "STORESCP"

    @property
    def pid(self) -> int:
        # single-process storescp (no --fork): the receiver is the process we started
        assert self.scp is not None and self.scp._process is not None
        return self.scp._process.pid

    def stored(self, ids: InstanceIds) -> int:
        assert self.scp is not None
        # storescp names files <modality>.<SOP Instance UID>.dcm
        names = {p.name.split(".", 1)[1].removesuffix(".dcm") for p in self.scp.received_files()}
        return len(ids.sop_uids & names)

    def describe(self) -> str:
        return "storescp (DCMTK storescp, no fsync, TCP_NODELAY=1)"


# ---------------------------------------------------------------------------- gateway state


def gateway_stored(db_path: Path, data_dir: Path, sop_uids: Iterable[str]) -> int:
    """How many of ``sop_uids`` the gateway recorded *and* has in its spool (read-only)."""
    uids = list(sop_uids)
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30.0)
    try:
        found = 0
        for start in range(0, len(uids), 500):
            chunk = uids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT path FROM instances WHERE sop_instance_uid IN ({marks})", chunk
            ).fetchall()
            found += sum(1 for (rel,) in rows if (data_dir / rel).is_file())
        return found
    finally:
        conn.close()


# ---------------------------------------------------------------------------- /proc


def proc_status_kb(pid: int, fields: Sequence[str] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Selected ``/proc/<pid>/status`` fields in kB (missing if the process is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------------------- reporting


def load_average() -> float:
    """1-minute load average: other work on a 2-core machine shows up in every number."""
    return round(os.getloadavg()[0], 2)


class Pressure:
    """Linux pressure stall information (PSI) over an interval: the share of wall time in
    which some task waited for a CPU or for I/O. Our own pushes contribute too, so compare
    runs with each other rather than reading it as pure outside noise. Empty without PSI."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.before = self._totals()

    @staticmethod
    def _totals() -> dict[str, int]:
        totals: dict[str, int] = {}
        for resource in ("cpu", "io"):
            try:
                text = Path(f"/proc/pressure/{resource}").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("some "):
                    totals[resource] = int(line.rsplit("total=", 1)[1])
        return totals

    def percent(self) -> dict[str, float]:
        elapsed_us = (time.monotonic() - self.started) * 1e6
        after = self._totals()
        return {
            f"{k}_some_pct": round(100.0 * (after[k] - self.before[k]) / elapsed_us, 1)
            for k in after
            if k in self.before and elapsed_us > 0
        }


def _first_line(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine_info(work_dir: Path) -> dict[str, Any]:
    """What a reader needs to compare numbers between machines."""
    import pydicom
    import pynetdicom

    fs = _first_line(["sh", "-c", f"df -T {work_dir} | tail -1"])
    dcmtk = _first_line([dcmtk_tool("storescu"), "--version"])
    match = re.search(r"v(\d+\.\d+\.\d+)", dcmtk)
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": match.group(1) if match else dcmtk,
        "orthanc": _first_line(["/usr/sbin/Orthanc", "--version"]).split()[-1],
        "work_dir_fs": " ".join(fs.split()[:2]),
        "telerad_commit": _first_line(["git", "-C", str(_REPO), "rev-parse", "--short", "HEAD"]),
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    line = fmt(headers)
    print(line)
    print("-" * len(line))
    for row in rows:
        print(fmt(row))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
