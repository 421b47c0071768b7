"""WADO-RS: how fast does the hub hand a viewer its frames, metadata and rendered images,
next to Orthanc's DICOMweb plugin serving the same instances in the same run?

``python -m benchmarks.wado [--slices N] [--rounds N] [--clients N] [--json OUT]``

One 512x512 CT series of ``--slices`` slices (default 80) twice: as generated (Explicit VR
Little Endian) and restamped + JPEG-LS lossless (what a modality or PACS sending compressed
leaves in the archive). Both go by DCMTK ``storescu`` into

* ``telerad`` - ``telerad hub serve`` as its own process (one uvicorn worker, filesystem
  archive, SQLite), through its own DICOM port from a registered source, read as a signed-in
  admin: every request is authenticated, checked against the access rule and audited;
* ``orthanc`` - Orthanc 1.10 with its DICOMweb plugin (Debian), ``TCP_NODELAY=1``, no
  authentication.

Workloads, each pass over every instance of a series, in the order OHIF v3 makes them:

* ``metadata``: ``GET /studies/{s}/series/{se}/metadata``, the first time (telerad reads
  the headers; measured on the JPEG-LS series and ``--cold-series`` restamped copies of it,
  each asked for once, and on the uncompressed one) and again (from telerad's header cache);
* ``frames``: ``GET .../instances/{i}/frames/1`` with OHIF's Accept
  (``multipart/related; type="application/octet-stream"; transfer-syntax=*``): the stored
  bytes, one request per slice, sequentially and from ``--clients`` concurrent clients (a
  browser opens up to 6 connections per host); also ``frames decoded``: ``type=
  application/octet-stream`` without a syntax, so the server decodes JPEG-LS;
* ``rendered``: telerad's ``.../instances/{i}/rendered`` (JPEG) and ``?accept=image/png``
  against Orthanc's ``/instances/{id}/rendered`` (JPEG) and ``/instances/{id}/preview``
  (PNG); first pass (telerad's render cache is empty) and second pass (cached; Orthanc
  renders again).

Each workload runs ``--rounds`` times per target, targets alternating; the median is kept.
Every answer is checked (status 200, and the same frame bytes from both) or the run fails.
Clients are Python ``httpx`` with keep-alive, in this process, the same for both targets.
"""

from __future__ import annotations

import argparse
import queue
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

from benchmarks._common import (
    MB,
    StorescuProfile,
    _cached,
    ct_series,
    load_average,
    machine_info,
    print_table,
    scratch_dir,
    sigterm_as_exit,
    storescu_push,
    write_json,
)
from reading_queue.accounts import Accounts
from reading_queue.intake.service import open_ingest
from reading_queue.settings import HubSettings
from sample_studies.generate import restamp
from tests.support.peers import OrthancServer, dcmtk_available, orthanc_available
from tests.support.telerad_procs import HubProcess, wait_until

OHIF_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DECODED_ACCEPT = 'multipart/related; type="application/octet-stream"'
PASSWORD = "benchmark password 42"
SOURCE_AET = "BENCH_SCU"


@dataclass
class Series:
    label: str
    study: str
    series: str
    sops: list[str]
    orthanc_ids: list[str]
    nbytes: int


def jpegls_copy(paths: list[Path], slices: int) -> list[Path]:
    """The series restamped and JPEG-LS lossless compressed (cached between runs)."""

    def make(root: Path) -> list[Path]:
        out = []
        for raw in restamp(paths, root / "raw", salt="bench-jpegls"):
            ds = dcmread(raw)
            ds.compress(JPEGLSLossless, generate_instance_uid=False)
            target = root / "jls" / raw.name
            target.parent.mkdir(exist_ok=True)
            ds.save_as(target, enforce_file_format=True)
            raw.unlink()
            out.append(target)
        return out

    return _cached(f"ct{slices}-jpegls", make)


def cold_copies(paths: list[Path], slices: int, copies: int) -> list[list[Path]]:
    """``copies`` more restamps of a series, each looked at once: the first look at a
    series' metadata can only be measured on a series nobody has asked for yet."""

    def make(index: int) -> Callable[[Path], list[Path]]:
        return lambda root: restamp(paths, root, salt=f"bench-cold-{index}")

    return [_cached(f"ct{slices}-jpegls-cold{i}", make(i)) for i in range(copies)]


def describe(paths: list[Path], label: str) -> Series:
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    headers.sort(key=lambda d: int(d.InstanceNumber))
    return Series(
        label,
        str(headers[0].StudyInstanceUID),
        str(headers[0].SeriesInstanceUID),
        [str(d.SOPInstanceUID) for d in headers],
        [],
        sum(p.stat().st_size for p in paths),
    )


# ---------------------------------------------------------------------------- peers


@dataclass
class Peer:
    name: str
    dicomweb: str
    headers: dict[str, str]
    rest: str = ""


def start_telerad(root: Path, series: Sequence[list[Path]]) -> tuple[HubProcess, Peer]:
    data_dir = root / "hub"
    settings = HubSettings(data_dir=data_dir)
    ingest = open_ingest(settings)
    ingest.add_station("bench")
    ingest.add_source(SOURCE_AET, "bench", "127.0.0.1")
    Accounts(ingest.engine).add_user("bench", "admin", PASSWORD)
    ingest.engine.dispose()
    hub = HubProcess(data_dir, env={"TELERAD_RELEASE_SETTLE_S": "0.5"})
    hub.start()
    for paths in series:
        profile = StorescuProfile.for_files(paths, root / "telerad-storescu.cfg")
        storescu_push(paths, "127.0.0.1", hub.dicom_port, "TELERAD_HUB", profile)
    wanted = sum(len(p) for p in series)
    wait_until(lambda: sum(hub.committed().values()) >= wanted, 120, "hub committed")
    token = httpx.post(
        f"{hub.url}/api/auth/token", data={"username": "bench", "password": PASSWORD}
    ).json()["access_token"]
    return hub, Peer("telerad", f"{hub.url}/dicom-web", {"Authorization": f"Bearer {token}"})


def start_orthanc(root: Path, series: Sequence[list[Path]]) -> tuple[OrthancServer, Peer]:
    server = OrthancServer(
        plugins=["dicomweb"],
        extra_config={"DefaultEncoding": "Utf8"},
        workdir=root / "orthanc",
        graceful_stop=False,
    )
    server.start()
    for paths in series:
        profile = StorescuProfile.for_files(paths, root / "orthanc-storescu.cfg")
        storescu_push(paths, "127.0.0.1", server.dicom_port, server.aet, profile)
    return server, Peer("orthanc", f"{server.url}/dicom-web", {}, rest=server.url)


def orthanc_ids(peer: Peer, series: Series) -> list[str]:
    out = []
    with httpx.Client(base_url=peer.rest, timeout=30) as client:
        for sop in series.sops:
            found = client.post("/tools/lookup", content=sop).json()
            out.append(next(f["ID"] for f in found if f["Type"] == "Instance"))
    return out


# ---------------------------------------------------------------------------- timing


def run_requests(
    urls: list[str], headers: dict[str, str], clients: int, check: Callable[[int, bytes], None]
) -> tuple[float, int]:
    """GET every URL from ``clients`` threads (a keep-alive client each); (seconds, bytes)."""
    work: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()
    for item in enumerate(urls):
        work.put(item)
    total = [0] * clients
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        with httpx.Client(headers=headers, timeout=60) as client:
            while True:
                try:
                    index, url = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    resp = client.get(url)
                    if resp.status_code != 200:
                        raise RuntimeError(f"{url}: HTTP {resp.status_code} {resp.text[:200]}")
                    check(index, resp.content)
                    total[slot] += len(resp.content)
                except BaseException as exc:
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, sum(total)


_BOUNDARY = re.compile(rb"^--([^\r\n]+)\r\n")


def first_part(body: bytes) -> bytes:
    """The payload of a multipart body's first part (to compare frames across servers)."""
    match = _BOUNDARY.match(body)
    if not match:
        raise RuntimeError(f"not a multipart body: {body[:80]!r}")
    start = body.index(b"\r\n\r\n") + 4
    end = body.index(b"\r\n--" + match.group(1), start)
    return body[start:end]


@dataclass
class Workload:
    name: str
    series: Series
    urls: dict[str, list[str]]  # peer -> urls
    headers: dict[str, dict[str, str]]
    clients: int
    unit: str  # what one request is: "frame", "image", "series"
    compare: bool = False


def measure(workloads: list[Workload], peers: list[Peer], rounds: int) -> list[dict[str, Any]]:
    results = []
    for w in workloads:
        seen: dict[str, dict[int, bytes]] = {}
        timings: dict[str, list[float]] = {p.name: [] for p in peers}
        volume: dict[str, int] = {}
        for _round in range(rounds):
            for peer in peers:
                kept = seen.setdefault(peer.name, {})

                def check(
                    index: int, body: bytes, kept: dict[int, bytes] = kept, w: Workload = w
                ) -> None:
                    if w.compare:
                        kept[index] = first_part(body)

                secs, nbytes = run_requests(
                    w.urls[peer.name], {**peer.headers, **w.headers[peer.name]}, w.clients, check
                )
                timings[peer.name].append(secs)
                volume[peer.name] = nbytes
        if w.compare and seen["telerad"] != seen["orthanc"]:
            raise RuntimeError(f"{w.name}: telerad and Orthanc sent different frame bytes")
        n = len(w.urls["telerad"])
        row: dict[str, Any] = {"workload": w.name, "series": w.series.label, "requests": n}
        for peer in peers:
            median = statistics.median(timings[peer.name])
            row[peer.name] = {
                "median_s": round(median, 4),
                "per_s": round(n / median, 1),
                "mb_per_s": round(volume[peer.name] / median / MB, 1),
                "runs_s": [round(t, 4) for t in timings[peer.name]],
            }
        row["ratio"] = round(row["telerad"]["per_s"] / row["orthanc"]["per_s"], 2)
        results.append(row)
        print(
            f"  {w.name:28} {w.series.label:13} telerad {row['telerad']['per_s']:8.1f}/s  "
            f"orthanc {row['orthanc']['per_s']:8.1f}/s  ratio {row['ratio']:.2f}",
            flush=True,
        )
    return results


def frame_urls(peer: Peer, s: Series) -> list[str]:
    base = f"{peer.dicomweb}/studies/{s.study}/series/{s.series}/instances"
    return [f"{base}/{sop}/frames/1" for sop in s.sops]


def workloads_for(s: Series, peers: dict[str, Peer], clients: int) -> list[Workload]:
    t, o = peers["telerad"], peers["orthanc"]
    ohif = {"telerad": {"Accept": OHIF_ACCEPT}, "orthanc": {"Accept": OHIF_ACCEPT}}
    decoded = {"telerad": {"Accept": DECODED_ACCEPT}, "orthanc": {"Accept": DECODED_ACCEPT}}
    frames = {"telerad": frame_urls(t, s), "orthanc": frame_urls(o, s)}
    out = [
        Workload("frames (as stored), 1 client", s, frames, ohif, 1, "frame", compare=True),
        Workload(f"frames (as stored), {clients} clients", s, frames, ohif, clients, "frame"),
    ]
    if s.label == "jpeg-ls":
        out.append(Workload(f"frames decoded, {clients} clients", s, frames, decoded,
                            clients, "frame", compare=True))  # fmt: skip
    return out


def metadata_workload(name: str, series: list[Series], peers: dict[str, Peer]) -> Workload:
    """One request per series in ``series`` (for the first look: series nobody asked for)."""
    none: dict[str, dict[str, str]] = {"telerad": {}, "orthanc": {}}
    urls = {
        peer: [f"{p.dicomweb}/studies/{s.study}/series/{s.series}/metadata" for s in series]
        for peer, p in peers.items()
    }
    return Workload(name, series[0], urls, none, 1, "series")


def rendered_workloads(s: Series, peers: dict[str, Peer], clients: int) -> list[Workload]:
    t, o = peers["telerad"], peers["orthanc"]
    base = f"{t.dicomweb}/studies/{s.study}/series/{s.series}/instances"
    jpeg = {
        "telerad": [f"{base}/{sop}/rendered" for sop in s.sops],
        "orthanc": [f"{o.rest}/instances/{oid}/rendered" for oid in s.orthanc_ids],
    }
    png = {
        "telerad": [f"{base}/{sop}/rendered?accept=image/png" for sop in s.sops],
        "orthanc": [f"{o.rest}/instances/{oid}/preview" for oid in s.orthanc_ids],
    }
    accept_jpeg = {"telerad": {}, "orthanc": {"Accept": "image/jpeg"}}
    accept_png: dict[str, dict[str, str]] = {"telerad": {}, "orthanc": {}}
    return [
        Workload("rendered jpeg, 1st pass", s, jpeg, accept_jpeg, 1, "image"),
        Workload("rendered jpeg, cached", s, jpeg, accept_jpeg, 1, "image"),
        Workload("rendered png, 1st pass", s, png, accept_png, 1, "image"),
        Workload("rendered png, cached", s, png, accept_png, 1, "image"),
        Workload(f"rendered jpeg, {clients} clients", s, jpeg, accept_jpeg, clients, "image"),
    ]


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    native_paths = ct_series(args.slices)
    jls_paths = jpegls_copy(native_paths, args.slices)
    cold_paths = cold_copies(jls_paths, args.slices, args.cold_series)
    native = describe(native_paths, "uncompressed")
    jls = describe(jls_paths, "jpeg-ls")
    cold_series = [describe(paths, "jpeg-ls") for paths in [jls_paths, *cold_paths]]
    load_before = load_average()
    with scratch_dir("telerad-bench-wado-", args.work_dir) as root:
        info = machine_info(root)
        print(
            f"wado: {args.slices}-slice 512x512 CT, {native.nbytes / MB:.1f} MB uncompressed, "
            f"{jls.nbytes / MB:.1f} MB JPEG-LS; {args.rounds} rounds, {args.clients} "
            f"concurrent clients; {info['cpus']} CPUs, load average {load_before:.2f}"
        )
        everything = [native_paths, jls_paths, *cold_paths]
        hub, telerad = start_telerad(root, everything)
        orthanc_server, orthanc = start_orthanc(root, everything)
        try:
            for s in (native, jls):
                s.orthanc_ids = orthanc_ids(orthanc, s)
            peers = {"telerad": telerad, "orthanc": orthanc}
            plist = [telerad, orthanc]
            print("  (per second: requests; ratio: telerad / orthanc, > 1 telerad faster)")
            # Metadata first, cold: series whose headers the hub has not read yet (the
            # copies, then the two series the other workloads use), one request each.
            results = measure(
                [metadata_workload("series metadata, first", cold_series, peers),
                 metadata_workload("series metadata, first", [native], peers)],
                plist, 1,
            )  # fmt: skip
            results += measure(
                [metadata_workload("series metadata, again", cold_series, peers),
                 metadata_workload("series metadata, again", [native], peers)],
                plist, args.rounds,
            )  # fmt: skip
            for s in (jls, native):
                results += measure(workloads_for(s, peers, args.clients), plist, args.rounds)
            # Rendered: one pass each for "1st pass" (cache empty), then rounds.
            rendered = rendered_workloads(jls, peers, args.clients)
            results += measure([rendered[0]], plist, 1)
            results += measure([rendered[1]], plist, args.rounds)
            results += measure([rendered[2]], plist, 1)
            results += measure([rendered[3]], plist, args.rounds)
            results += measure([rendered[4]], plist, args.rounds)
        finally:
            hub.stop()
            orthanc_server.stop()
    load_after = load_average()
    print(
        f"\nmedians of {args.rounds} rounds (first-pass rows: one); load average "
        f"{load_before:.2f} before, {load_after:.2f} after"
    )
    print_table(
        ["workload", "series", "n", "telerad /s", "orthanc /s", "telerad/orthanc"],
        [
            (
                r["workload"],
                r["series"],
                str(r["requests"]),
                f"{r['telerad']['per_s']:.1f}",
                f"{r['orthanc']['per_s']:.1f}",
                f"{r['ratio']:.2f}x",
            )
            for r in results
        ],
    )
    return {
        "benchmark": "wado",
        "machine": info,
        "load_average": {"before": load_before, "after": load_after},
        "params": {
            "slices": args.slices,
            "rounds": args.rounds,
            "clients": args.clients,
            "cold_series": args.cold_series,
            "bytes": {"uncompressed": native.nbytes, "jpeg-ls": jls.nbytes},
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.wado",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--slices", type=int, default=80, help="CT slices (>= 60 by default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument(
        "--cold-series", type=int, default=3, help="extra JPEG-LS copies for first-look metadata"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.slices < 1 or args.rounds < 1 or args.clients < 1:
        parser.error("--slices, --rounds and --clients must be >= 1")
    if not dcmtk_available() or not orthanc_available():
        print("needs DCMTK and Orthanc (+ orthanc-dicomweb): apt-get install ...", file=sys.stderr)
        return 2
    sigterm_as_exit()
    payload = run(args)
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
