"""OHIF viewer: how long until a radiologist sees the first image of a study, and until the
whole stack has been shown, with the hub's OHIF and DICOMweb, next to the same OHIF build
reading Orthanc's DICOMweb plugin, in the same run, on the same stored files?

``python -m benchmarks.ohif_viewer [--quick] [--rounds N] [--links loopback,10M]
[--modality-syntax native|jpegls] [--json OUT [--json-requests]] [--keep DIR]``

Studies: the demo set (``benchmarks._common.sample_set``): a 120-slice 512x512 CT (30 with
``--quick``) and a 2500x2048 chest CR, pushed by DCMTK ``storescu`` into a station gateway
that forwards to the hub, both ``telerad ... serve`` processes with their **default
configuration** (the test helpers' overrides removed, as in ``benchmarks.wire``). The
gateway's bundles carry the pixels JPEG-LS compressed, but the hub restores and archives
the instances byte for byte as the modality sent them: Explicit VR Little Endian for the
generated files, JPEG-LS lossless with ``--modality-syntax jpegls`` (copies made once with
pydicom, cached). Orthanc gets *the files from the hub's archive* by ``storescu``, so both
serve the same transfer syntax and the same frame bytes.

Sides, each in a fresh Chromium context (no HTTP cache, no cookies) for every measurement:

* ``hub``: the hub's own pages. The reader (a radiologist with both studies on her
  worklist) signs in through ``/login`` (``next=/healthz``: nothing of OHIF is fetched
  before the clock starts), then the clock starts at ``page.goto(/viewer?
  StudyInstanceUIDs=<uid>)``. OHIF and its ``app-config.js`` come from the hub.
* ``orthanc``: Orthanc 1.10 + its DICOMweb plugin (Debian), ``TCP_NODELAY=1``,
  ``DefaultEncoding: Utf8``, defaults otherwise (so HTTP gzip is on). Orthanc has no CORS, so
  a front server (``FrontServer``: aiohttp in a process of its own) serves the same OHIF
  build (the same precompressed ``.gz`` files, the same cache headers) with the **same**
  ``app-config.js`` (``viewer_api.routes.viewer.app_config_js``) at its root, and streams
  ``/dicom-web/...`` to Orthanc's ``/dicom-web/...`` over keep-alive connections, headers
  and bodies untouched (``Accept-Encoding`` passed on, nothing decompressed). What it adds
  per request is measured in the run (``front_overhead``). No sign-in.

Links: ``loopback`` (the browser straight to the hub's, or the front server's, HTTP port),
and ``10M``: a ``FaultProxy`` (tests/support/faultproxy.py) in front of that port, 10 Mbit/s
per direction, 50 ms one way (100 ms RTT), a router-sized queue of ~0.5 s of link time
(``benchmarks.wire.router_chunks``). The browser goes to the proxy's port: the page's origin
is then the proxy's host:port, and the hub's cookie and CSRF origin checks see that origin
(signing in through the proxy is part of every 10M hub measurement).

Measured, per (link, study, side), ``--rounds`` times (sides alternating), medians kept:

* **first image**: from ``page.goto`` until the viewport's canvas holds an image: a probe
  in the page (``_PROBE``) samples cornerstone's canvas every 20 ms and stamps the first
  sample with many grey levels; that sample is checked again with
  ``tests.support.browser.image_spread``, and so is a canvas screenshot taken after the
  last slice (the run fails otherwise). Screenshots during loading would cost the timing.
* **all slices**: until every instance of the series has had a ``/frames/`` response
  finish in the page's network events (``requestfinished``; the end taken from the
  browser's own request timing), with no input: OHIF 3.12 with the hub's ``app-config.js``
  prefetches the whole stack after the first image (each run records how many frames came
  without input, ``prefetched``). Should it stop short (nothing new for
  ``PREFETCH_QUIET_S``), the script pages through the stack as a reader holding the
  down-arrow key would, never faster than OHIF shows each slice (``_PAGER``: OHIF's
  ``nextImage`` command, the one bound to ``ArrowDown``, run once the previous slice was
  displayed), and the time runs until the last slice is displayed (``scrolled`` in the
  output). Fast key presses are no substitute: over the slow link cornerstone loads only the
  slices it lands on. For the CR (one frame) it is when that frame's response ended.
* **bytes**: every response the page received (headers + encoded body, Playwright's
  ``request.sizes()``), split into OHIF's own files and DICOMweb; through the proxy also what
  the proxy delivered to the browser.

The default run takes ~7-11 minutes on the 2-core VM (most of it the 10 Mbit/s CT: 63 MB
of frames at the hub, 50 s of link time a load), ``--quick`` ~3. Every process is stopped
and every temporary file removed at the end, also on errors, Ctrl-C and SIGTERM (``--keep
DIR`` keeps logs and data). Results and the analysis: docs/performance.md, "OHIF viewer".
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread

from benchmarks._common import (
    MB,
    Pressure,
    StorescuProfile,
    _cached,
    load_average,
    machine_info,
    print_table,
    sample_set,
    sigterm_as_exit,
    storescu_push,
    write_json,
)
from benchmarks.wire import router_chunks
from tests.support import faultproxy
from tests.support.browser import _NO_TOURS, CHROMIUM_ARGS, image_spread
from tests.support.faultproxy import FaultProxy
from tests.support.peers import (
    OrthancServer,
    chromium_binary,
    dcmtk_available,
    find_orthanc_plugin,
    free_port,
    orthanc_available,
    wait_for_port,
)
from tests.support.telerad_procs import GatewayProcess, HubProcess, wait_until

LINK_BPS = 10_000_000  # 10 Mbit/s per direction ...
LATENCY_S = 0.050  # ... 50 ms one way: 100 ms round trip
PASSWORD = "benchmark password 42"
USERNAME = "lan"
VIEWPORT = (1280, 900)
FIRST_IMAGE_DEADLINE_S = 120.0
ALL_SLICES_DEADLINE_S = 240.0
#: No frame response finished for this long: OHIF is not prefetching more (then: page).
PREFETCH_QUIET_S = 5.0

ROSTER = """
radiologists:
  - key: dr.lan
    modalities: [CT, CR]
    licences: [VN]
    languages: [vi, km]
    max_concurrent: 10
    shifts: ["daily 00:00-24:00"]
stations:
  - name: tram-1
    institution: Tram Y Te 1
    jurisdiction: VN-HN
    language: vi
"""

#: The test helpers' speed-ups (tests/support/telerad_procs.py) are removed so that gateway
#: and hub run with the product's defaults; ports and bind addresses stay.
_KEPT_ENV = ("TELERAD_HTTP_PORT", "TELERAD_HTTP_HOST", "TELERAD_DICOM_HOST")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _product_env(proc: GatewayProcess | HubProcess) -> None:
    proc.env = {k: v for k, v in proc.env.items() if not k.startswith("TELERAD_") or k in _KEPT_ENV}


# ---------------------------------------------------------------------------- studies


@dataclass
class Study:
    name: str  # "CT" or "CR"
    study_uid: str
    series_uid: str
    sops: list[str]
    transfer_syntax: str = ""
    stored_bytes: int = 0
    stored_files: list[Path] = field(default_factory=list)


def describe(name: str, paths: Sequence[Path]) -> Study:
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    series = {str(h.SeriesInstanceUID) for h in headers}
    if len(series) != 1:
        raise RuntimeError(f"{name}: expected one series, found {len(series)}")
    return Study(
        name,
        str(headers[0].StudyInstanceUID),
        series.pop(),
        [str(h.SOPInstanceUID) for h in headers],
    )


def jpegls_copies(paths: Sequence[Path], slices: int) -> list[Path]:
    """The demo set JPEG-LS lossless compressed, same UIDs (cached): a modality or PACS that
    sends compressed (``--modality-syntax jpegls``)."""
    from pydicom.uid import JPEGLSLossless

    def make(root: Path) -> list[Path]:
        out = []
        for src in paths:
            ds = dcmread(src)
            ds.compress(JPEGLSLossless, generate_instance_uid=False)
            target = root / src.parent.name / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target, enforce_file_format=True)
            out.append(target)
        return out

    return _cached(f"samples-ct{slices}-jpegls", make)


# ---------------------------------------------------------------------------- the hub side


@dataclass
class HubSide:
    hub: HubProcess

    @property
    def url(self) -> str:
        return self.hub.url

    @property
    def port(self) -> int:
        return self.hub.http_port


def prepare_hub(data_dir: Path) -> str:
    """Radiologist, station and the reader's account, as ``telerad hub roster load`` and
    ``telerad hub user add`` would make them; returns the station's upload token."""
    from reading_queue.accounts import Accounts
    from reading_queue.intake.service import open_ingest
    from reading_queue.settings import HubSettings
    from reading_queue.worklist.roster import load_roster
    from reading_queue.worklist.worker import open_worklist

    roster_file = data_dir.parent / "roster.yaml"
    roster_file.write_text(ROSTER)
    settings = HubSettings(data_dir=data_dir)
    ingest = open_ingest(settings)
    try:
        worklist = open_worklist(settings, ingest.engine, ingest.first_header)
        tokens = worklist.load_roster(load_roster(roster_file))
        Accounts(ingest.engine).add_user(USERNAME, "radiologist", PASSWORD, radiologist="dr.lan")
    finally:
        ingest.engine.dispose()
    return tokens["tram-1"]


def bearer(base_url: str) -> dict[str, str]:
    response = httpx.post(
        f"{base_url}/api/auth/token", data={"username": USERNAME, "password": PASSWORD}
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def start_hub_and_push(root: Path, paths: Sequence[Path], studies: Sequence[Study]) -> HubSide:
    """Hub and gateway processes with their defaults; storescu -> gateway -> hub; wait until
    the reader can see both studies (committed, on her worklist). The gateway is stopped."""
    data_dir = root / "hub"
    data_dir.mkdir(parents=True)
    token = prepare_hub(data_dir)
    hub = HubProcess(data_dir)
    _product_env(hub)
    try:
        hub.start()
        gateway = GatewayProcess(root / "gw", hub_url=hub.url, token=token, aet="TELERAD_GW")
        _product_env(gateway)
        with gateway:
            profile = StorescuProfile.for_files(paths, root / "gateway-storescu.cfg")
            started = time.monotonic()
            seconds = storescu_push(paths, "127.0.0.1", gateway.dicom_port, gateway.aet, profile)
            log(f"pushed {len(paths)} files into the gateway in {seconds:.1f} s")
            headers = bearer(hub.url)

            def visible() -> bool:
                for s in studies:
                    r = httpx.get(
                        f"{hub.url}/dicom-web/studies",
                        params={"StudyInstanceUID": s.study_uid},
                        headers=headers,
                    )
                    if r.status_code != 200 or not r.content or not r.json():
                        return False
                return True

            wait_until(visible, 300, "both studies committed and on the reader's worklist", 0.5)
            log(
                f"both studies visible to {USERNAME}"
                f" {time.monotonic() - started:.1f} s after the push"
            )
    except BaseException:
        hub.kill9()
        raise
    return HubSide(hub)


def stored_files(hub_data: Path, study: Study) -> list[Path]:
    """The files as the hub archived them (``<archive>/<study>/<series>/<sop>.dcm``)."""
    found = {
        p.stem: p
        for p in hub_data.rglob("*.dcm")
        if ".tmp" not in p.parts and p.parent.name == study.series_uid
    }
    missing = [sop for sop in study.sops if sop not in found]
    if missing:
        raise RuntimeError(f"{study.name}: {len(missing)} instances not in the hub's archive")
    return [found[sop] for sop in study.sops]


# ---------------------------------------------------------------------------- the Orthanc side


class FrontServer:
    """The same-origin front for Orthanc: OHIF's files, the hub's app-config.js, and
    ``/dicom-web`` streamed to Orthanc. Runs this module with ``--serve-front`` in a process
    of its own, so the benchmark's Python threads do not slow it down."""

    def __init__(self, upstream: str, dist: Path, log_path: Path) -> None:
        self.upstream = upstream
        self.dist = dist
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FrontServer:
        self.port = free_port()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.ohif_viewer",
                    "--serve-front",
                    "--upstream",
                    self.upstream,
                    "--dist",
                    str(self.dist),
                    "--port",
                    str(self.port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        wait_for_port("127.0.0.1", self.port, 30, process=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


def serve_front(upstream: str, dist: Path, port: int) -> None:
    """The front server's process (``--serve-front``): aiohttp, one event loop."""
    import asyncio

    from aiohttp import ClientSession, TCPConnector, web

    from viewer_api.routes.viewer import (
        IMMUTABLE,
        MEDIA_TYPES,
        NOT_SERVED,
        OHIF_ROUTES,
        REVALIDATE,
        app_config_js,
    )

    hashed = re.compile(r"(?:^|\.)[0-9a-f]{16,}\.")
    index = (dist / "index.html").read_bytes()
    config = app_config_js()
    root = dist.resolve()

    async def app_config(_request: web.Request) -> web.Response:
        return web.Response(
            text=config, content_type="text/javascript", headers={"Cache-Control": REVALIDATE}
        )

    async def page(_request: web.Request) -> web.Response:
        return web.Response(
            body=index, content_type="text/html", headers={"Cache-Control": REVALIDATE}
        )

    async def static(request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        if not rel or rel in NOT_SERVED or any(p.startswith(".") for p in rel.split("/")):
            raise web.HTTPNotFound()
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise web.HTTPNotFound()
        media = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        if media.startswith("text/"):
            media += "; charset=utf-8"
        headers = {
            "Content-Type": media,
            "Cache-Control": IMMUTABLE if hashed.search(path.name) else REVALIDATE,
        }
        # FileResponse sends a .gz/.br sibling when Accept-Encoding allows, as the hub does
        return web.FileResponse(path, headers=headers)

    async def dicomweb(request: web.Request) -> web.StreamResponse:
        session: ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        url = f"{upstream}{request.rel_url.raw_path_qs}"
        async with session.request(
            request.method, url, headers=headers, data=await request.read() or None
        ) as up:
            out = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    out.headers.add(k, v)
            if up.content_length is not None:
                out.content_length = up.content_length
            await out.prepare(request)
            async for chunk in up.content.iter_chunked(256 * 1024):
                await out.write(chunk)
            await out.write_eof()
            return out

    async def on_startup(app: web.Application) -> None:
        app["session"] = ClientSession(
            connector=TCPConnector(limit=64, keepalive_timeout=60),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/dicom-web/{path:.*}", dicomweb)
    app.router.add_get("/app-config.js", app_config)
    app.router.add_get("/", page)
    for route in OHIF_ROUTES:
        app.router.add_get(f"/{route}", page)
        app.router.add_get(f"/{route}/{{rest:.*}}", page)
    app.router.add_get("/{path:.*}", static)
    asyncio.run(_run_app(app, port))


async def _run_app(app: Any, port: int) -> None:
    import asyncio
    import signal

    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


def front_overhead(orthanc: OrthancSide, study: Study, count: int = 20) -> dict[str, Any]:
    """What the front server adds per request: the same frames (as the browser asks for
    them, gzip accepted) straight from Orthanc and through the front, one client, keep-alive."""
    headers = {
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*",
        "Accept-Encoding": "gzip, deflate",
    }
    paths = [
        f"/dicom-web/studies/{study.study_uid}/series/{study.series_uid}/instances/{sop}/frames/1"
        for sop in study.sops[:count]
    ]
    times: dict[str, list[float]] = {"direct": [], "front": []}
    bases = {"direct": orthanc.orthanc.url, "front": orthanc.front.url}
    with contextlib.ExitStack() as stack:
        clients = {
            name: stack.enter_context(httpx.Client(base_url=base, headers=headers, timeout=60))
            for name, base in bases.items()
        }
        for path in paths:  # warm-up: Orthanc's caches, both connections up
            for client in clients.values():
                client.get(path).raise_for_status()
        for i, path in enumerate(paths):  # then alternating, frame by frame
            for name in ("direct", "front") if i % 2 else ("front", "direct"):
                started = time.perf_counter()
                clients[name].get(path).raise_for_status()
                times[name].append(time.perf_counter() - started)
    out: dict[str, Any] = {
        f"{name}_ms_median": round(1000 * statistics.median(t), 1) for name, t in times.items()
    }
    out["frames"] = len(paths)
    return out


@dataclass
class OrthancSide:
    orthanc: OrthancServer
    front: FrontServer

    @property
    def url(self) -> str:
        return self.front.url

    @property
    def port(self) -> int:
        return self.front.port


def start_orthanc(
    root: Path, files: Sequence[Path], dist: Path, extra: dict[str, Any] | None = None
) -> OrthancSide:
    server = OrthancServer(
        plugins=["dicomweb"],
        extra_config={"DefaultEncoding": "Utf8", **(extra or {})},
        workdir=root / "orthanc",
        graceful_stop=False,
    )
    server.start()
    try:
        profile = StorescuProfile.for_files(files, root / "orthanc-storescu.cfg")
        seconds = storescu_push(files, "127.0.0.1", server.dicom_port, server.aet, profile)
        log(f"pushed the hub's {len(files)} stored files into Orthanc in {seconds:.1f} s")
        with server.client() as client:
            count = client.get("/statistics").json()["CountInstances"]
        if count != len(files):
            raise RuntimeError(f"Orthanc holds {count} instances, {len(files)} pushed")
        front = FrontServer(f"{server.url}", dist, root / "front.log").start()
    except BaseException:
        server.stop()
        raise
    return OrthancSide(server, front)


# ---------------------------------------------------------------------------- the browser

#: In the page: stamp the first moment the viewport's canvas holds an image (many grey
#: levels). The canvas is cornerstone's on-screen 2D canvas; every 20 ms the probe draws it
#: scaled down into a 160x160 canvas and counts the grey levels there, which costs the
#: renderer far less on 2 cores than screenshots or full-size readbacks would (a canvas
#: screenshot took 0.4-2.9 s here while OHIF was loading). It keeps that sample as a PNG,
#: which Python checks again with ``image_spread``.
_PROBE = r"""
(() => {
  window.__firstImage = null;
  const levelsMin = %(levels)d, stdMin = %(std)f;
  let small = null;
  const timer = setInterval(() => {
    const c = document.querySelector('canvas.cornerstone-canvas');
    if (!c || c.width < 16 || c.height < 16) return;
    if (!small) small = document.createElement('canvas');
    small.width = 160; small.height = 160;
    const ctx = small.getContext('2d', {willReadFrequently: true});
    ctx.drawImage(c, 0, 0, 160, 160);
    const d = ctx.getImageData(0, 0, 160, 160).data;
    const seen = new Uint8Array(256);
    let n = 0, sum = 0, sum2 = 0, levels = 0;
    for (let i = 0; i < d.length; i += 4) {
      const g = (d[i] * 299 + d[i + 1] * 587 + d[i + 2] * 114) / 1000 | 0;
      if (!seen[g]) { seen[g] = 1; levels++; }
      n++; sum += g; sum2 += g * g;
    }
    const std = Math.sqrt(Math.max(0, sum2 / n - (sum / n) * (sum / n)));
    if (levels > levelsMin && std > stdMin) {
      const t = performance.timeOrigin + performance.now();
      window.__firstImage = {t, levels, std, png: small.toDataURL('image/png')};
      clearInterval(timer);
    }
  }, 20);
})();
"""

#: In the page: page through the stack as a reader holding the down-arrow key would, but
#: never faster than OHIF shows each slice: run the command OHIF binds to ``ArrowDown``
#: (``nextImage``) once the slice before has been displayed (cornerstone's
#: ``STACK_NEW_IMAGE`` on the viewport, then one animation frame), until the last slice.
#: Resolves with the wall time (ms) each slice index was first displayed. Fast key presses
#: over a slow link do not do this: cornerstone loads only the slices it lands on. Only used
#: when OHIF's own prefetch stops short of the whole stack (it did not in any run so far).
_PAGER = r"""
([n, deadlineMs]) => new Promise((resolve, reject) => {
  const cs = window.cornerstone;
  const vp = cs.getRenderingEngines()[0].getViewports().find(v => v.getImageIds);
  if (!vp) { reject(new Error('no stack viewport')); return; }
  const el = vp.element, shown = {};
  const now = () => performance.timeOrigin + performance.now();
  shown[vp.getCurrentImageIdIndex()] = now();
  let target = vp.getCurrentImageIdIndex() + 1;
  if (target >= n) { resolve(shown); return; }
  const onNew = (e) => {
    const k = e.detail.imageIdIndex;
    if (shown[k] === undefined) shown[k] = now();
    if (k >= n - 1) {
      el.removeEventListener(cs.EVENTS.STACK_NEW_IMAGE, onNew);
      resolve(shown);
      return;
    }
    if (k === target) {
      target = k + 1;
      requestAnimationFrame(() => window.commandsManager.runCommand('nextImage'));
    }
  };
  el.addEventListener(cs.EVENTS.STACK_NEW_IMAGE, onNew);
  setTimeout(() => reject(new Error('slice ' + target + ' not shown in time')), deadlineMs);
  window.commandsManager.runCommand('nextImage');
})
"""
_SPREAD_STD_MIN = 10.0
_SPREAD_LEVELS_MIN = 32


@dataclass
class Finished:
    url: str
    request: Any
    seen_at: float  # time.time() when the event reached this process


@dataclass
class Capture:
    """The page's network events, as they come."""

    finished: list[Finished] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("requestfinished", lambda r: self.finished.append(Finished(r.url, r, time.time())))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.method} {r.url}: {r.failure}"))
        page.on(
            "response",
            lambda r: (
                self.errors.append(f"{r.request.method} {r.url}: {r.status}")
                if r.status >= 400
                else None
            ),
        )


def _kind(url: str) -> str:
    path = url.split("?", 1)[0]
    if "/dicom-web/" not in path:
        return "ohif"
    if "/frames/" in path:
        return "frames"
    if path.endswith("/metadata"):
        return "metadata"
    return "qido"


def frames_done(capture: Capture, study: Study) -> dict[str, float]:
    """SOP Instance UID -> wall time (s) its first ``/frames/`` response ended."""
    done: dict[str, float] = {}
    marker = f"/series/{study.series_uid}/instances/"
    for f in list(capture.finished):
        if "/frames/" not in f.url or marker not in f.url:
            continue
        sop = f.url.split(marker, 1)[1].split("/", 1)[0]
        if sop in done:
            continue
        done[sop] = f.seen_at
    return done


def response_end(request: Any) -> float:
    """When the response ended, wall seconds, from the browser's own timing."""
    t = request.timing
    return (t["startTime"] + max(t["responseEnd"], 0.0)) / 1000.0


@dataclass
class Measurement:
    side: str
    link: str
    study: str
    round: int
    first_image_s: float
    all_slices_s: float
    scrolled: bool
    prefetched: int  # frames of the series finished before any input
    frames: int
    bytes_total: int
    bytes_ohif: int
    bytes_dicomweb: int
    proxy_bytes_down: int | None
    spread: tuple[float, int]  # the probe's sample at the first image
    end_spread: tuple[float, int]  # a canvas screenshot after the last slice
    screenshot_s: float
    #: seconds from goto until each stack index was first displayed (paging)
    shown_s: list[float]
    requests: list[dict[str, Any]]
    problems: list[str]


def sign_in_page(page: Any, base_url: str) -> None:
    """Through the hub's sign-in page, as a person would; ``next`` is a page that is not
    OHIF, so nothing of the viewer is in the browser's cache when the clock starts."""
    page.goto(f"{base_url}/login?next=%2Fhealthz")
    page.fill("input[name=username]", USERNAME)
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation(url=re.compile(r"/healthz$")):
        page.click("button[type=submit]")
    cookies = {c["name"] for c in page.context.cookies()}
    if "telerad_session" not in cookies:
        raise RuntimeError(f"sign-in through {base_url} set no session cookie: {cookies}")


def measure(
    browser: Any,
    *,
    side: str,
    link: str,
    base_url: str,
    study: Study,
    round_no: int,
    sign_in: bool,
    proxy: FaultProxy | None,
) -> Measurement:
    context = browser.new_context(
        service_workers="block", viewport={"width": VIEWPORT[0], "height": VIEWPORT[1]}
    )
    try:
        context.add_init_script(_NO_TOURS)
        page = context.new_page()
        if sign_in:
            sign_in_page(page, base_url)
        capture = Capture()
        capture.attach(page)
        page.add_init_script(_PROBE % {"levels": _SPREAD_LEVELS_MIN, "std": _SPREAD_STD_MIN})
        down0 = proxy.bytes_down if proxy is not None else 0
        n = len(study.sops)
        t0 = time.time()
        page.goto(f"{base_url}/viewer?StudyInstanceUIDs={study.study_uid}", wait_until="commit")
        page.wait_for_function(
            "() => window.__firstImage !== null", timeout=FIRST_IMAGE_DEADLINE_S * 1000, polling=100
        )
        first = page.evaluate("() => window.__firstImage")
        first_image_s = first["t"] / 1000.0 - t0
        spread = image_spread(base64.b64decode(first["png"].split(",", 1)[1]))
        if spread[0] <= _SPREAD_STD_MIN or spread[1] <= _SPREAD_LEVELS_MIN:
            raise RuntimeError(f"{side} {study.name}: the probe's sample is no image: {spread}")

        # OHIF prefetches the stack by itself: count the finished frame responses. If nothing
        # new finishes for PREFETCH_QUIET_S, page through the stack instead (``_PAGER``).
        # page.wait_for_timeout, not time.sleep: the sync API delivers events only while
        # this thread is inside a Playwright call.
        deadline = time.monotonic() + ALL_SLICES_DEADLINE_S
        count, since = -1, time.monotonic()
        while True:
            now = len(frames_done(capture, study))
            if now >= n:
                break
            if now != count:
                count, since = now, time.monotonic()
            elif time.monotonic() - since > PREFETCH_QUIET_S:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{side} {study.name}: {now}/{n} frames")
            page.wait_for_timeout(50)
        prefetched = len(frames_done(capture, study))
        shown: dict[str, float] = {}
        scrolled = prefetched < n
        if scrolled:
            shown = page.evaluate(_PAGER, [n, ALL_SLICES_DEADLINE_S * 1000])
            while len(frames_done(capture, study)) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{side} {study.name}: frames missing after paging")
                page.wait_for_timeout(50)
        done = frames_done(capture, study)
        # the browser's own stamp for each instance's first finished frame response
        ends: dict[str, float] = {}
        for f in capture.finished:
            if "/frames/" in f.url and f"/series/{study.series_uid}/" in f.url:
                sop = f.url.split("/instances/", 1)[1].split("/", 1)[0]
                t = response_end(f.request)
                ends[sop] = min(ends.get(sop, t), t)
        last_shown = max(shown.values()) / 1000.0 if shown else 0.0
        all_slices_s = max(max(ends.values()), last_shown) - t0
        # the viewport still shows an image (the last slice): a real screenshot this time
        canvas = page.locator("canvas.cornerstone-canvas").first
        shot_started = time.monotonic()
        end_spread = image_spread(canvas.screenshot())
        screenshot_s = time.monotonic() - shot_started
        if end_spread[0] <= _SPREAD_STD_MIN or end_spread[1] <= _SPREAD_LEVELS_MIN:
            raise RuntimeError(f"{side} {study.name}: the last screenshot shows no image")
        page.wait_for_timeout(300)  # trailing responses finish before bytes are counted
        proxy_down = proxy.bytes_down - down0 if proxy is not None else None
        requests, totals = request_log(capture, t0)
        problems = capture.failed + capture.errors
        return Measurement(
            side=side,
            link=link,
            study=study.name,
            round=round_no,
            first_image_s=round(first_image_s, 3),
            all_slices_s=round(all_slices_s, 3),
            scrolled=scrolled,
            prefetched=prefetched,
            frames=len(done),
            bytes_total=totals["ohif"] + totals["dicomweb"],
            bytes_ohif=totals["ohif"],
            bytes_dicomweb=totals["dicomweb"],
            proxy_bytes_down=proxy_down,
            spread=(round(spread[0], 1), spread[1]),
            end_spread=(round(end_spread[0], 1), end_spread[1]),
            screenshot_s=round(screenshot_s, 3),
            shown_s=[round(shown[k] / 1000.0 - t0, 3) for k in sorted(shown, key=int)],
            requests=requests,
            problems=problems,
        )
    finally:
        context.close()


def request_log(capture: Capture, t0: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows = []
    totals = {"ohif": 0, "dicomweb": 0}
    for f in capture.finished:
        r = f.request
        try:
            sizes = r.sizes()
        except Exception:  # the request is gone (e.g. a redirect's)
            sizes = {"responseBodySize": 0, "responseHeadersSize": 0}
        size = max(sizes.get("responseBodySize", 0), 0) + max(
            sizes.get("responseHeadersSize", 0), 0
        )
        t = r.timing
        kind = _kind(f.url)
        totals["ohif" if kind == "ohif" else "dicomweb"] += size
        rows.append(
            {
                "kind": kind,
                "url": f.url.split("/dicom-web", 1)[-1]
                if kind != "ohif"
                else f.url.rsplit("/", 1)[-1][:80],
                "start_s": round(t["startTime"] / 1000.0 - t0, 4),
                "ttfb_ms": round(t["responseStart"], 1) if t["responseStart"] >= 0 else None,
                "end_ms": round(t["responseEnd"], 1) if t["responseEnd"] >= 0 else None,
                "bytes": size,
            }
        )
    rows.sort(key=lambda row: row["start_s"])
    return rows, totals


@dataclass
class Side:
    name: str
    direct_url: str
    direct_port: int
    sign_in: bool
    proxy: FaultProxy | None = None

    def base(self, link: str) -> str:
        if link == "loopback":
            return self.direct_url
        assert self.proxy is not None
        return f"http://127.0.0.1:{self.proxy.port}"


def summarise(rows: list[Measurement]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str], dict[str, list[Measurement]]] = {}
    for m in rows:
        cells.setdefault((m.study, m.link), {}).setdefault(m.side, []).append(m)
    out = []
    for (study, link), by_side in cells.items():
        row: dict[str, Any] = {"study": study, "link": link}
        for side, ms in by_side.items():
            row[side] = {
                "first_image_s": statistics.median(m.first_image_s for m in ms),
                "all_slices_s": statistics.median(m.all_slices_s for m in ms),
                "bytes_total": int(statistics.median(m.bytes_total for m in ms)),
                "bytes_ohif": int(statistics.median(m.bytes_ohif for m in ms)),
                "bytes_dicomweb": int(statistics.median(m.bytes_dicomweb for m in ms)),
                "proxy_bytes_down": (
                    int(statistics.median(m.proxy_bytes_down for m in ms if m.proxy_bytes_down))
                    if all(m.proxy_bytes_down for m in ms)
                    else None
                ),
                "first_image_runs": [m.first_image_s for m in ms],
                "all_slices_runs": [m.all_slices_s for m in ms],
                "scrolled": any(m.scrolled for m in ms),
                "where": _where(ms),
            }
        if "hub" in row and "orthanc" in row:
            row["ratio_first_image"] = round(
                row["orthanc"]["first_image_s"] / row["hub"]["first_image_s"], 2
            )
            row["ratio_all_slices"] = round(
                row["orthanc"]["all_slices_s"] / row["hub"]["all_slices_s"], 2
            )
        out.append(row)
    return out


def _where(ms: list[Measurement]) -> dict[str, float | None]:
    """Medians over runs of the network-log figures the report shows."""
    ph = [phases(m) for m in ms]

    def med(key: str, scale: float = 1.0) -> float | None:
        values = [p[key] * scale for p in ph if p.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    for p, m in zip(ph, ms, strict=True):
        if p.get("first_qido_start") is not None:
            p["data_to_first_image_s"] = m.first_image_s - p["first_qido_start"]
        if p.get("frames"):
            p["bytes_per_frame"] = p["frame_bytes"] / p["frames"]
    return {
        "first_dicomweb_request_s": med("first_qido_start"),
        "data_to_first_image_s": med("data_to_first_image_s"),
        "ohif_files_done_s": med("ohif_files_done"),
        "metadata_ms": med("first_metadata_ms"),
        "metadata_bytes": med("metadata_bytes"),
        "frame_ttfb_ms": med("frame_ttfb_ms_median"),
        "frame_ms": med("frame_ms_median"),
        "bytes_per_frame": med("bytes_per_frame"),
    }


def phases(m: Measurement) -> dict[str, Any]:
    """Where a page load's time went, from its network log (seconds from ``goto``)."""
    reqs = m.requests

    def first(kind: str) -> dict[str, Any] | None:
        return next((r for r in reqs if r["kind"] == kind), None)

    def last_end(kind: str) -> float | None:
        ends = [
            r["start_s"] + r["end_ms"] / 1000 for r in reqs if r["kind"] == kind and r["end_ms"]
        ]
        return round(max(ends), 3) if ends else None

    out: dict[str, Any] = {"ohif_files_done": last_end("ohif")}
    for kind in ("qido", "metadata", "frames"):
        r = first(kind)
        if r is not None:
            out[f"first_{kind}_start"] = r["start_s"]
            out[f"first_{kind}_ttfb_ms"] = r["ttfb_ms"]
            out[f"first_{kind}_ms"] = r["end_ms"]
    meta = [r for r in reqs if r["kind"] == "metadata"]
    if meta:
        out["metadata_ms"] = [r["end_ms"] for r in meta]
        out["metadata_bytes"] = sum(r["bytes"] for r in meta)
    frames = [r for r in reqs if r["kind"] == "frames"]
    if frames:
        ttfb = [r["ttfb_ms"] for r in frames if r["ttfb_ms"] is not None]
        dur = [r["end_ms"] for r in frames if r["end_ms"] is not None]
        out["frames"] = len(frames)
        out["frame_ttfb_ms_median"] = round(statistics.median(ttfb), 1) if ttfb else None
        out["frame_ms_median"] = round(statistics.median(dur), 1) if dur else None
        out["frame_bytes"] = sum(r["bytes"] for r in frames)
    return out


def run(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    from viewer_api.routes.viewer import viewer_dir, viewer_installed

    dist = viewer_dir()
    if not viewer_installed(dist):
        raise SystemExit(
            f"the OHIF viewer is not installed in {dist}: run scripts/install_viewer.sh"
        )
    binary = chromium_binary()
    if binary is None:
        raise SystemExit("Debian chromium is needed (apt-get install chromium)")
    slices = args.slices or (30 if args.quick else 120)
    paths = sample_set(slices)
    if args.modality_syntax == "jpegls":
        paths = jpegls_copies(paths, slices)
    ct = describe("CT", [p for p in paths if p.parent.name.lower().startswith("ct")])
    cr = describe("CR", [p for p in paths if p.parent.name.lower().startswith("cr")])
    studies = [ct, cr]
    links = [link.strip() for link in args.links.split(",") if link.strip()]
    with contextlib.ExitStack() as stack:
        log(
            f"hub: {len(paths)} files ({sum(p.stat().st_size for p in paths) / MB:.1f} MB) by"
            " storescu -> gateway -> hub, default settings"
        )
        hub = start_hub_and_push(work, paths, studies)
        stack.callback(hub.hub.kill9)
        stack.callback(hub.hub.stop)
        files: list[Path] = []
        for s in studies:
            s.stored_files = stored_files(hub.hub.data_dir, s)
            s.stored_bytes = sum(p.stat().st_size for p in s.stored_files)
            s.transfer_syntax = str(
                dcmread(s.stored_files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
            )
            files += s.stored_files
        extra = {k: json.loads(v) for k, v in (i.split("=", 1) for i in args.orthanc_config)}
        orthanc = start_orthanc(work, files, dist, extra)
        stack.callback(orthanc.orthanc.stop)
        stack.callback(orthanc.front.stop)
        results["front_overhead"] = front_overhead(orthanc, ct)
        log(f"front server: {results['front_overhead']}")
        sides = [
            Side("hub", hub.url, hub.port, sign_in=True),
            Side("orthanc", orthanc.url, orthanc.port, sign_in=False),
        ]
        chunks = router_chunks(LINK_BPS)
        for side in sides:
            proxy = stack.enter_context(
                FaultProxy("127.0.0.1", side.direct_port, buffer_chunks=chunks)
            )
            proxy.bandwidth_bps = LINK_BPS
            proxy.latency_s = LATENCY_S
            side.proxy = proxy
        results["studies"] = {
            s.name: {
                "instances": len(s.sops),
                "stored_bytes": s.stored_bytes,
                "transfer_syntax": s.transfer_syntax,
            }
            for s in studies
        }
        results["config"].update(
            {
                "link_bps": LINK_BPS,
                "latency_s": LATENCY_S,
                "buffer_chunks": chunks,
                "chunk_bytes": int(LINK_BPS / 8 * faultproxy._CHUNK_SECONDS),
                "orthanc": orthanc.orthanc.config().get("DicomWeb", "plugin defaults"),
            }
        )
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(
            executable_path=binary, headless=True, args=list(CHROMIUM_ARGS)
        )
        stack.callback(browser.close)

        rows: list[Measurement] = []
        results["runs"] = []
        wanted = {name.strip() for name in args.studies.split(",")}
        for link in links:
            for study in [s for s in studies if s.name in wanted]:
                for round_no in range(1, args.rounds + 1):
                    order = sides if round_no % 2 else sides[::-1]
                    for side in order:
                        m = measure(
                            browser,
                            side=side.name,
                            link=link,
                            base_url=side.base(link),
                            study=study,
                            round_no=round_no,
                            sign_in=side.sign_in,
                            proxy=side.proxy if link != "loopback" else None,
                        )
                        rows.append(m)
                        run_row = {k: v for k, v in m.__dict__.items() if k != "requests"}
                        run_row["phases"] = phases(m)
                        results["runs"].append(run_row)
                        if args.json_requests:
                            run_row["requests"] = m.requests
                        log(
                            f"{link:8} {study.name} #{round_no} {side.name:8} first image"
                            f" {m.first_image_s:6.2f} s, all {m.frames} frames"
                            f" {m.all_slices_s:6.2f} s,"
                            f" {m.bytes_total / MB:6.1f} MB"
                            + (
                                f" ({len(m.problems)} problems: {m.problems[:2]})"
                                if m.problems
                                else ""
                            )
                        )
        results["summary"] = summarise(rows)


def render(results: dict[str, Any]) -> None:
    cfg = results["config"]
    print()
    print(
        f"OHIF {results['ohif_version']} in headless Chromium; link '10M' = FaultProxy"
        f" {cfg['link_bps'] / 1e6:.0f} Mbit/s, {cfg['latency_s'] * 1000:.0f} ms one way,"
        f" queue {cfg['buffer_chunks']} x {cfg['chunk_bytes']} B;"
        f" medians of {cfg['rounds']} (fresh browser context each)"
    )
    print(
        f"  the modality sent: {cfg['modality_syntax']} files; Orthanc extra settings:"
        f" {', '.join(cfg['orthanc_config']) or 'none'}"
    )
    for name, s in results["studies"].items():
        print(
            f"  {name}: {s['instances']} instances, {s['stored_bytes'] / MB:.1f} MB stored as"
            f" {s['transfer_syntax']}"
        )
    runs = results.get("runs", [])
    paged = [r for r in runs if r["scrolled"]]
    ct = [r for r in runs if r["study"] == "CT"]
    if ct:
        print(
            f"  OHIF fetched every CT frame by itself (no input) in {len(ct) - len(paged)} of"
            f" {len(ct)} CT runs"
            + (
                f"; paged through the stack in {len(paged)}: "
                + ", ".join(f"{r['side']} {r['link']} #{r['round']}" for r in paged)
                if paged
                else ""
            )
        )
    rows = []
    for r in results["summary"]:
        for side in ("hub", "orthanc"):
            if side not in r:
                continue
            c = r[side]
            rows.append(
                (
                    f"{r['study']} {r['link']}",
                    side,
                    f"{c['first_image_s']:.2f}",
                    f"{c['all_slices_s']:.2f}",
                    f"{c['bytes_total'] / MB:.1f}",
                    f"{c['bytes_dicomweb'] / MB:.1f}",
                    f"{c['proxy_bytes_down'] / MB:.1f}" if c["proxy_bytes_down"] else "-",
                    f"{r['ratio_first_image']:.2f}"
                    if side == "orthanc" and "ratio_first_image" in r
                    else "",
                    f"{r['ratio_all_slices']:.2f}"
                    if side == "orthanc" and "ratio_all_slices" in r
                    else "",
                )
            )
    print()
    print_table(
        [
            "study link",
            "side",
            "first image s",
            "all slices s",
            "MB",
            "DICOMweb MB",
            "proxy MB",
            "first: orthanc/hub",
            "all: orthanc/hub",
        ],
        rows,
    )
    print(
        "  ratio > 1: the hub is faster. MB: response headers + encoded bodies seen by the page"
        " (OHIF's files + DICOMweb); proxy MB: what the proxy delivered to the browser"
    )
    rows = []
    for r in results["summary"]:
        for side in ("hub", "orthanc"):
            if side not in r:
                continue
            w = r[side]["where"]

            def f(v: float | None, fmt: str = "{:.2f}") -> str:
                return "-" if v is None else fmt.format(v)

            rows.append(
                (
                    f"{r['study']} {r['link']}",
                    side,
                    f(w["first_dicomweb_request_s"]),
                    f(w["data_to_first_image_s"]),
                    f(w["metadata_ms"], "{:.0f}"),
                    f(
                        None if w["metadata_bytes"] is None else w["metadata_bytes"] / 1000,
                        "{:.1f}",
                    ),
                    f(w["frame_ttfb_ms"], "{:.0f}"),
                    f(w["frame_ms"], "{:.0f}"),
                    f(
                        None if w["bytes_per_frame"] is None else w["bytes_per_frame"] / 1000,
                        "{:.0f}",
                    ),
                )
            )
    print("\nwhere the time goes (medians; from the page's network log, s after goto):")
    print_table(
        [
            "study link",
            "side",
            "1st DICOMweb req s",
            "-> first image s",
            "metadata ms",
            "metadata kB",
            "frame TTFB ms",
            "frame ms",
            "kB/frame",
        ],
        rows,
    )
    fo = results.get("front_overhead")
    if fo:
        print(
            f"  front server (Orthanc side): a frame straight from Orthanc {fo['direct_ms_median']}"
            f" ms, through the front {fo['front_ms_median']} ms (median of {fo['frames']},"
            " loopback, gzip accepted)"
        )


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ohif_viewer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a 30-slice CT instead of 120")
    parser.add_argument("--slices", type=int, help="CT slices (default 120, --quick 30)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per cell (median)")
    parser.add_argument(
        "--modality-syntax",
        choices=("native", "jpegls"),
        default="native",
        help="what the modality sends: the generated files as they are (Explicit VR Little"
        " Endian, default) or JPEG-LS lossless copies of them",
    )
    parser.add_argument("--links", default="loopback,10M", help="loopback, 10M or both")
    parser.add_argument("--studies", default="CT,CR", help="CT, CR or both")
    parser.add_argument(
        "--orthanc-config",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra Orthanc setting for experiments, e.g. HttpCompressionEnabled=false",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work here and keep it")
    parser.add_argument(
        "--json-requests", action="store_true", help="put every run's network log in --json"
    )
    parser.add_argument("--serve-front", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--dist", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_front:
        serve_front(args.upstream, args.dist, args.port)
        return 0
    if not dcmtk_available() or not orthanc_available() or find_orthanc_plugin("dicomweb") is None:
        print(
            "needs DCMTK and Orthanc with its DICOMweb plugin: apt-get install dcmtk orthanc"
            " orthanc-dicomweb",
            file=sys.stderr,
        )
        return 2
    sigterm_as_exit()
    from viewer_api.routes.viewer import viewer_dir

    package = viewer_dir().parent / "package.json"
    results: dict[str, Any] = {
        "benchmark": "ohif_viewer",
        "ohif_version": json.loads(package.read_text())["version"] if package.is_file() else "?",
        "config": {
            "rounds": args.rounds,
            "quick": args.quick,
            "links": args.links,
            "modality_syntax": args.modality_syntax,
            "orthanc_config": args.orthanc_config,
        },
        "load_average": {"before": load_average()},
    }
    pressure = Pressure()
    started = time.monotonic()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work_ctx: contextlib.AbstractContextManager[str] = contextlib.nullcontext(str(args.keep))
    else:
        work_ctx = tempfile.TemporaryDirectory(prefix="telerad-bench-ohif-")
    try:
        with work_ctx as work_name:
            results["machine"] = machine_info(Path(work_name))
            run(args, Path(work_name), results)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    results["load_average"]["after"] = load_average()
    results["pressure"] = pressure.percent()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    render(results)
    print(
        f"\n(total {results['elapsed_s']:.0f} s; load average {results['load_average']['before']}"
        f" before, {results['load_average']['after']} after; PSI {results['pressure']})"
    )
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
