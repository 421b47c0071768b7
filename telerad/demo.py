"""``telerad demo``: a hub and a station gateway on loopback with the sample studies flowing.

It is the quick start's first command: generate the samples (once), start a hub (filesystem
archive, SQLite) with a small roster, and a gateway, push the samples into the gateway with a
C-STORE SCU as a modality would, wait until the hub has committed every study, and show the
reading queue assigning them to radiologists (push mode), with the reasons.
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

from dicom_gateway.station.scu import send_paths
from dicom_gateway.station.service import Gateway
from dicom_gateway.station.settings import GatewaySettings
from reading_queue import QueueError
from reading_queue.accounts import Accounts, new_password
from reading_queue.settings import HubSettings
from reading_queue.worklist.roster import RadiologistSpec, Roster, ShiftSpec, StationSpec
from telerad.core.priority import Priority
from telerad.hub import Hub

#: Around the clock, so the demo assigns whatever the time of day.
_ALWAYS = [ShiftSpec(days="daily", start="00:00", end="24:00")]
DEMO_ROSTER = Roster(
    radiologists=[
        RadiologistSpec(
            key="dr.lan",
            name="BS. Nguyen Lan (demo)",
            modalities=["CT", "CR", "DX"],
            subspecialties=["neuro"],
            licences=["VN"],
            languages=["vi", "en"],
            shifts=_ALWAYS,
            max_concurrent=3,
            rvu_per_hour=8,
        ),
        RadiologistSpec(
            key="dr.minh",
            name="BS. Tran Minh (demo)",
            modalities=["CR", "DX"],
            licences=["VN-HN"],
            languages=["vi"],
            shifts=_ALWAYS,
            max_concurrent=3,
            rvu_per_hour=10,
        ),
        RadiologistSpec(
            key="dr.sok",
            name="Dr. Sok Dara (demo)",
            modalities=["CT", "CR"],
            licences=["KH"],
            languages=["km", "en"],
            timezone="Asia/Phnom_Penh",
            shifts=_ALWAYS,
        ),
    ],
    stations=[
        StationSpec(
            name="demo-station",
            institution="Tram y te xa (demo)",
            jurisdiction="VN-HN",
            language="vi",
        )
    ],
)


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
    hub.worklist.load_roster(DEMO_ROSTER)  # creates the station, or updates it
    try:
        token = hub.ingest.rotate_token("demo-station")
    except QueueError:
        token = hub.ingest.add_station("demo-station")
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
        f"hub on {hub_url} (DICOM {hub.inbox.listener.port}); gateway DEMO_GW on DICOM port "
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
        if not _show_worklist(hub, set(expected), console):
            return 1
        _show_sign_in(hub, hub_url, sorted(expected), console)
        console.print(
            f"next: telerad hub worklist --data-dir {data_dir / 'hub'}   |   "
            f"telerad hub study history UID --data-dir {data_dir / 'hub'}   |   "
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


#: the demo's people: the demo roster's Vietnamese radiologists and an admin
DEMO_USERS = (
    ("lan", "radiologist", "dr.lan"),
    ("minh", "radiologist", "dr.minh"),
    ("admin", "admin", None),
)


def _show_sign_in(hub: Hub, hub_url: str, uids: list[str], console: Console) -> None:
    """Demo users with fresh passwords (printed: this hub listens on loopback only), and
    each study's viewer link with who may open it."""
    accounts = Accounts(hub.ingest.engine)
    known = {u.username for u in accounts.users()}
    readers: dict[str, str] = {}
    table = Table(title=f"Sign in at {hub_url}/login")
    for col in ("user", "role", "password"):
        table.add_column(col, no_wrap=True)
    for username, role, key in DEMO_USERS:
        password = new_password()
        if username in known:
            accounts.set_password(username, password)
            accounts.set_active(username, True)
        else:
            accounts.add_user(username, role, password, radiologist=key)
        if key:
            readers[key] = username
        table.add_row(username, role, password)
    console.print(table)
    for st in hub.worklist.studies():
        if st.study_uid not in uids:
            continue
        who = readers.get(st.assignee or "", "")
        console.print(
            f"{st.modality}: {hub_url}/viewer?StudyInstanceUIDs={st.study_uid}"
            f"  (sign in as {who + ' or ' if who else ''}admin)",
            soft_wrap=True,
            highlight=False,
        )


def _show_worklist(hub: Hub, uids: set[str], console: Console) -> bool:
    """Wait for the queue to pick the committed studies up and print who reads what, and why."""
    deadline = time.monotonic() + 60
    while True:
        hub.queue.notify()
        rows = [st for st in hub.worklist.studies() if st.study_uid in uids]
        if len(rows) == len(uids) and all(st.assignee for st in rows):
            break
        if time.monotonic() > deadline:
            console.print("[red]the reading queue did not assign the studies within 60 s[/]")
            return False
        time.sleep(0.2)
    table = Table(title="Reading queue (push mode)")
    for col in ("study", "priority", "state", "radiologist", "due in", "chosen because"):
        table.add_column(col, overflow="fold")
    now = time.time()
    for st in rows:
        assigned = [e for e in hub.worklist.history(st.study_uid) if e.kind == "assigned"]
        reasons = assigned[-1].detail.get("reasons", []) if assigned else []
        table.add_row(
            st.study_uid,
            Priority(st.priority).label,
            st.state,
            st.assignee or "",
            f"{(st.deadline - now) / 3600:.1f} h",
            "; ".join(r.removeprefix("chosen: ") for r in reasons if r.startswith("chosen")),
        )
    console.print(table)
    return True
