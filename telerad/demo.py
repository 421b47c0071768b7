"""``telerad demo``: a hub and a station gateway on loopback with the sample studies flowing.

It is the quick start's first command: generate the samples (once), start a hub (filesystem
archive, SQLite) and a gateway, push the samples into the gateway with a C-STORE SCU as a
modality would, and wait until the hub has committed every study.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

from pydicom import dcmread
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dicom_gateway.scu import send_paths
from dicom_gateway.service import Gateway
from reading_queue import QueueError
from telerad.config import GatewaySettings, HubSettings, Priority
from telerad.hub import Hub


def run_demo(data_dir: Path, *, ct_slices: int, serve: bool, console: Console) -> int:
    from sample_studies.generate import generate_samples

    data_dir = data_dir.resolve()
    samples_dir = data_dir / "samples"
    if not any(samples_dir.rglob("*.dcm")):
        console.print(f"generating sample studies in {samples_dir} ...")
        generate_samples(samples_dir, ct_slices=ct_slices)
    files = sorted(samples_dir.rglob("*.dcm"))
    expected = Counter(str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files)

    hub = Hub(
        HubSettings(
            data_dir=data_dir / "hub",
            http_port=0,
            dicom_port=0,
            http_host="127.0.0.1",
            dicom_host="127.0.0.1",
            quiet_period_s=5,
        )
    )
    hub.start_dicom()
    hub.start_http()
    deadline = time.monotonic() + 30
    while not hub.started:
        if time.monotonic() > deadline:
            console.print("[red]hub HTTP server did not start[/]")
            return 1
        time.sleep(0.05)
    try:
        token = hub.ingest.add_station("demo-station")
    except QueueError:
        token = hub.ingest.rotate_token("demo-station")
    hub_url = f"http://127.0.0.1:{hub.http_port}"
    gw = Gateway(
        GatewaySettings(
            data_dir=data_dir / "gateway",
            dicom_port=0,
            dicom_host="127.0.0.1",
            http_port=0,
            hub_url=hub_url,
            token=token,
            quiet_period_s=5,
            aet="DEMO_GW",
        )
    )
    gw.start()
    console.print(
        f"hub on {hub_url} (DICOM {hub.listener.port}); gateway DEMO_GW on DICOM port "
        f"{gw.listener.port}, health http://127.0.0.1:{gw.http_port}/healthz"
    )
    started = time.monotonic()
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("modality -> gateway (C-STORE)", total=len(files))
            report = send_paths(
                [samples_dir],
                f"DEMO_GW@127.0.0.1:{gw.listener.port}",
                calling_aet="DEMO_MODALITY",
                progress=lambda n: progress.advance(task, n),
            )
            if report.failed:
                console.print(f"[red]{len(report.failed)} instances refused by the gateway[/]")
                return 1
            hub_task = progress.add_task("gateway -> hub (committed)", total=len(files))
            while True:
                studies = {s.study_uid: s for s in hub.ingest.studies()}
                done = sum(
                    studies[uid].instance_count
                    for uid in expected
                    if uid in studies and studies[uid].state == "committed"
                )
                progress.update(hub_task, completed=done)
                if all(
                    uid in studies
                    and studies[uid].state == "committed"
                    and studies[uid].instance_count >= n
                    for uid, n in expected.items()
                ):
                    break
                if time.monotonic() - started > 900:
                    console.print("[red]studies did not reach the hub within 15 minutes[/]")
                    return 1
                time.sleep(0.5)
        table = Table(title=f"Committed at the hub in {time.monotonic() - started:.1f} s")
        for col in ("study", "modality", "priority", "instances", "MB"):
            table.add_column(col)
        for s in hub.ingest.studies():
            if s.study_uid in expected:
                table.add_row(
                    s.study_uid,
                    s.modality,
                    Priority(s.priority).label,
                    str(s.instance_count),
                    f"{s.bytes / 1e6:.1f}",
                )
        console.print(table)
        console.print(
            f"next: telerad hub studies --data-dir {data_dir / 'hub'}   |   "
            f"telerad gateway status --data-dir {data_dir / 'gateway'}"
        )
        if serve:
            console.print("serving; Ctrl-C to stop")
            stop = threading.Event()
            try:
                while not stop.wait(1.0):
                    pass
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        gw.stop()
        hub.stop()
