"""Rendered: milliseconds per image for DICOMweb ``/rendered`` and ``/thumbnail`` output.

Question: can the hub render key images and thumbnails for a reading room without a
rendering farm, and how does it compare with Orthanc on the same files? Inputs are the
benchmark sample set (``benchmarks/_common.py``): one 512x512 16-bit signed CT slice and a
2500x2048 12-bit chest CR, each as generated (Explicit VR LE) and as JPEG-LS lossless (what
stations send). Each is rendered with its own window to:

* ``jpeg``: full size, quality 90; ``png``: full size, 8-bit;
* ``jpeg@512``: fitted into a 512x512 viewport; ``thumb``: JPEG fitted into 128x128.

Columns, each the median of ``--repeat`` calls after one warm-up:

* ``render``: ``viewer_api.rendering.render`` on a dataset already in memory;
* ``read+render``: ``dcmread`` of the file, then ``render``: what a route does per request
  without a cache;
* ``cache hit``: ``RenderCache.get`` of the stored result (a file read + checksum);
* ``orthanc``: the same file's ``GET /instances/{id}/rendered`` (Orthanc 1.10 core; ``width``,
  ``height`` and ``smooth=1`` for the viewport rows) over loopback HTTP with keep-alive, the
  instance uploaded first. Its time includes HTTP (the ``http floor`` line: ``GET /system``) and it
  keeps recently parsed files in memory, so it sits between our ``render`` and
  ``read+render``. ``ratio`` is orthanc / read+render;
* ``diff max/mean``: |ours - Orthanc's| in grey levels over the decoded outputs. PNG rows
  are lossless on both sides, so this is the difference of the window arithmetic; JPEG rows
  add both encoders' losses; viewport rows add the resampling filters (ours is Lanczos after
  an integer box reduction, closer to an area average than Orthanc's smoothing).

When the hub's HTTP routes exist, the same comparison through them belongs here too.

    python -m benchmarks.rendered [--repeat N] [--quick] [--no-orthanc] [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless

from benchmarks._common import (
    load_average,
    machine_info,
    print_table,
    sample_set,
    scratch_dir,
    sigterm_as_exit,
    write_json,
)
from tests.support.peers import OrthancServer, orthanc_available
from viewer_api.rendering import RenderCache, RenderKey, render


@dataclass(frozen=True)
class Output:
    name: str
    media_type: str
    viewport: tuple[int, int] | None


OUTPUTS = (
    Output("jpeg", "image/jpeg", None),
    Output("png", "image/png", None),
    Output("jpeg@512", "image/jpeg", (512, 512)),
    Output("thumb", "image/jpeg", (128, 128)),
)
QUALITY = 90


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_ms(call: Callable[[], object], repeat: int) -> float:
    call()  # warm-up: imports, first-touch allocations, Orthanc's parsed-file cache
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.int16)


class OrthancPeer:
    """Orthanc with the inputs uploaded; renders over its REST API."""

    def __init__(self, stack: ExitStack, root: Path) -> None:
        self.server = stack.enter_context(
            OrthancServer("BENCH", workdir=root / "orthanc", graceful_stop=False)
        )
        self.client: httpx.Client = stack.enter_context(self.server.client())
        self.ids: dict[Path, str] = {}

    def upload(self, path: Path) -> None:
        response = self.client.post("/instances", content=path.read_bytes())
        response.raise_for_status()
        self.ids[path] = response.json()["ID"]

    def render(self, path: Path, output: Output) -> bytes:
        params: dict[str, Any] = {"quality": QUALITY}
        if output.viewport is not None:  # smooth: Orthanc's default is nearest neighbour
            params.update(width=output.viewport[0], height=output.viewport[1], smooth=1)
        response = self.client.get(
            f"/instances/{self.ids[path]}/rendered",
            params=params,
            headers={"Accept": output.media_type},
        )
        response.raise_for_status()
        return response.content

    def http_floor_ms(self, repeat: int) -> float:
        return median_ms(lambda: self.client.get("/system").raise_for_status(), repeat)

    def version(self) -> str:
        return str(self.client.get("/system").json().get("Version", "?"))


def make_inputs(root: Path) -> dict[str, Path]:
    ct, cr = sample_set(1)
    inputs = {"CT 512x512 16-bit": ct, "CR 2500x2048 12-bit": cr}
    for label, path in list(inputs.items()):
        ds = dcmread(path)
        # a new SOP Instance UID: Orthanc would take the copy for a duplicate and keep the
        # uncompressed original
        ds.compress(JPEGLSLossless, generate_instance_uid=True)
        compressed = root / f"{path.stem}_jls.dcm"
        ds.save_as(compressed, enforce_file_format=True)
        inputs[f"{label} JPEG-LS"] = compressed
    return inputs


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    with ExitStack() as stack:
        root = stack.enter_context(scratch_dir("telerad-bench-rendered-"))
        inputs = make_inputs(root)
        orthanc: OrthancPeer | None = None
        if args.orthanc:
            orthanc = OrthancPeer(stack, root)
            for path in inputs.values():
                orthanc.upload(path)
        cache = RenderCache(root / "cache", 1 << 30)
        info = machine_info(root)
        floor = orthanc.http_floor_ms(args.repeat * 4) if orthanc else None
        for label, path in inputs.items():
            ds: Dataset = dcmread(path)
            large = ds.Rows * ds.Columns > 1_000_000
            repeat = max(3, args.repeat // 5) if large else args.repeat
            for output in OUTPUTS:
                log(f"{label}: {output.name} x{repeat}")

                def ours(ds: Dataset = ds, output: Output = output) -> bytes:
                    return render(
                        ds, media_type=output.media_type, viewport=output.viewport, quality=QUALITY
                    )

                def read_and_render(path: Path = path, output: Output = output) -> bytes:
                    return render(
                        dcmread(path),
                        media_type=output.media_type,
                        viewport=output.viewport,
                        quality=QUALITY,
                    )

                data = ours()
                key = RenderKey(
                    str(ds.SOPInstanceUID), 1, output.media_type, None, output.viewport,
                    QUALITY, path.name,
                )  # fmt: skip
                cache.put(key, data)
                row: dict[str, Any] = {
                    "input": label,
                    "output": output.name,
                    "repeat": repeat,
                    "bytes": len(data),
                    "render_ms": median_ms(ours, repeat),
                    "read_render_ms": median_ms(read_and_render, repeat),
                    "cache_hit_ms": median_ms(functools.partial(cache.get, key), repeat * 4),
                }
                if orthanc is not None:
                    theirs = orthanc.render(path, output)
                    row["orthanc_bytes"] = len(theirs)
                    row["orthanc_ms"] = median_ms(
                        functools.partial(orthanc.render, path, output), repeat
                    )
                    ours_px, theirs_px = _decoded(data), _decoded(theirs)
                    if ours_px.shape == theirs_px.shape:
                        diff = np.abs(ours_px - theirs_px)
                        row["diff_max"], row["diff_mean"] = int(diff.max()), float(diff.mean())
                    else:
                        row["diff_max"] = row["diff_mean"] = f"size {theirs_px.shape[::-1]}"
                results.append(row)
        payload: dict[str, Any] = {
            "benchmark": "rendered",
            "machine": info,
            "load_average_end": load_average(),
            "quality": QUALITY,
            "http_floor_ms": floor,
            "orthanc_version": orthanc.version() if orthanc else None,
            "results": results,
        }
    report(payload)
    return payload


def report(payload: dict[str, Any]) -> None:
    headers = ["input", "output", "KB", "render", "read+render", "cache hit"]
    with_orthanc = payload["http_floor_ms"] is not None
    if with_orthanc:
        headers += ["orthanc", "ratio", "diff max/mean"]
    rows = []
    for r in payload["results"]:
        row = [
            r["input"],
            r["output"],
            f"{r['bytes'] / 1000:.0f}",
            f"{r['render_ms']:.2f}",
            f"{r['read_render_ms']:.2f}",
            f"{r['cache_hit_ms']:.3f}",
        ]
        if with_orthanc:
            row += [
                f"{r['orthanc_ms']:.2f}",
                f"{r['orthanc_ms'] / r['read_render_ms']:.2f}x",
                f"{r['diff_max']}/{r['diff_mean']:.2f}"
                if isinstance(r["diff_mean"], float)
                else str(r["diff_mean"]),
            ]
        rows.append(row)
    print()
    print(f"ms per image (median), JPEG quality {payload['quality']}")
    print_table(headers, rows)
    if with_orthanc:
        print(
            f"http floor (Orthanc GET /system): {payload['http_floor_ms']:.2f} ms; "
            f"Orthanc {payload['orthanc_version']}"
        )
    print(f"load average at the end: {payload['load_average_end']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.rendered",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=50, help="calls per CT measurement")
    parser.add_argument("--quick", action="store_true", help="--repeat 10")
    parser.add_argument(
        "--no-orthanc", dest="orthanc", action="store_false", help="skip the Orthanc peer"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 10
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.orthanc and not orthanc_available():
        print("Orthanc not found (apt-get install orthanc), or pass --no-orthanc", file=sys.stderr)
        return 2
    sigterm_as_exit()
    payload = run(args)
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
