"""telerad: teleradiology store-and-forward (station gateway and hub).

Every option is also a TELERAD_<NAME> environment variable and a key of the TOML file given
with --config (tables "gateway" and "hub"); the command line wins over the environment, which
wins over the file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from telerad import __version__
from telerad.config import GatewaySettings, HubSettings, Priority

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
gateway_app = typer.Typer(help="Station gateway: DICOM listener and store-and-forward.")
hub_app = typer.Typer(help="Hub: receives station uploads and DICOM, keeps the archive.")
station_app = typer.Typer(help="Stations allowed to upload to this hub.")
samples_app = typer.Typer(help="Synthetic sample studies.")
app.add_typer(gateway_app, name="gateway")
app.add_typer(hub_app, name="hub")
hub_app.add_typer(station_app, name="station")
app.add_typer(samples_app, name="samples")

console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file ([gateway], [hub] tables).")
]
DataDirOpt = Annotated[Path | None, typer.Option(help="State, spool and archive directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # One line per HTTP request drowns what a person wants to see; -v shows them.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _use_config(config: Path | None) -> None:
    if config is not None:
        if not config.exists():
            raise typer.BadParameter(f"{config} does not exist", param_hint="--config")
        os.environ["TELERAD_CONFIG"] = str(config)


def _settings(cls: Any, config: Path | None, **flags: Any) -> Any:
    _use_config(config)
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    except Exception as exc:
        console.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal; tab-separated lines when piped, so UIDs (up to 64
    characters) are never wrapped or cut and scripts can read the output."""
    out = Console()
    if out.is_terminal:
        table = Table(title=title)
        for col in columns:
            table.add_column(col, no_wrap=col in ("study", "SOP Instance UID"))
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    typer.echo(f"# {title}")
    typer.echo("\t".join(columns))
    for row in rows:
        typer.echo("\t".join(row))


def _wait_forever(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


# -- gateway ------------------------------------------------------------------------------


@gateway_app.command("serve")
def gateway_serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM listener port.")] = None,
    aet: Annotated[str | None, typer.Option(help="Our AE title.")] = None,
    hub_url: Annotated[str | None, typer.Option(help="Hub base URL (https://...).")] = None,
    token: Annotated[str | None, typer.Option(help="Station token from the hub.")] = None,
    http_port: Annotated[int | None, typer.Option(help="/healthz and /metrics port.")] = None,
    quiet_period_s: Annotated[
        float | None, typer.Option(help="Seconds of silence that complete a study.")
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the station gateway: durable C-STORE listener and forwarders to the hub and PACS."""
    from dicom_gateway.service import Gateway

    _setup_logging(verbose)
    settings = _settings(
        GatewaySettings,
        config,
        data_dir=data_dir,
        dicom_port=dicom_port,
        aet=aet,
        hub_url=hub_url,
        token=token,
        http_port=http_port,
        quiet_period_s=quiet_period_s,
    )
    gw = Gateway(settings)
    gw.start()
    console.print(
        f"gateway {settings.aet} listening on DICOM port {gw.listener.port}"
        + (
            f", health on http://{settings.http_host}:{gw.http_port}/healthz"
            if gw.http_port
            else ""
        )
    )
    stop = threading.Event()
    _wait_forever(stop)
    gw.stop()


@gateway_app.command("status")
def gateway_status_cmd(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Each study's state, the link state, backlog and ETA, and the quarantine."""
    from dicom_gateway.service import gateway_status, quarantine_list
    from dicom_gateway.state import StateDB

    settings = _settings(GatewaySettings, config, data_dir=data_dir)
    db_path = settings.data_dir / "gateway.sqlite3"
    if not db_path.exists():
        console.print(f"[red]no gateway state in {settings.data_dir}[/]")
        raise typer.Exit(1)
    state = StateDB(db_path)
    status = gateway_status(state, settings.quiet_period_s)
    status["quarantine"] = quarantine_list(state)
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    out = Console()
    _print_table(
        "Studies",
        ["study", "prio", "mod", "from", "inst", "MB", "state", "sent %"],
        [
            [
                s["study_uid"],
                s["priority"],
                s["modality"],
                s["calling_aet"],
                str(s["instances"]),
                f"{s['bytes'] / 1e6:.1f}",
                s["state"],
                f"{s['sent_percent']:.0f}",
            ]
            for s in status["studies"]
        ],
    )
    for link in status["links"]:
        out.print(
            f"link {link['destination']}: {link['state']} ({link['detail']}), "
            f"last ok {_when(link['last_ok'])}, rate {link['rate_bps'] / 1e6:.2f} Mbit/s"
        )
    eta = status["eta_s"]
    out.print(
        f"backlog {status['backlog_bytes'] / 1e6:.1f} MB"
        + (f", ETA {eta:.0f} s" if eta is not None else "")
    )
    if status["quarantine"]:
        _print_table(
            "Quarantine",
            ["when", "status", "reason", "from", "SOP Instance UID", "file"],
            [
                [
                    _when(item["created_at"]),
                    f"0x{item['status']:04X}",
                    item["reason"],
                    item["calling_aet"],
                    item["sop_instance_uid"],
                    item["path"],
                ]
                for item in status["quarantine"]
            ],
        )


@gateway_app.command("priority")
def gateway_priority(
    study_uid: str,
    priority: Annotated[str, typer.Argument(help="stat, urgent or routine")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Change a study's priority; the forward queue re-orders at the next chunk."""
    from dicom_gateway import GatewayError
    from dicom_gateway.state import StateDB

    settings = _settings(GatewaySettings, config, data_dir=data_dir)
    try:
        prio = Priority.parse(priority)
        StateDB(settings.data_dir / "gateway.sqlite3").set_priority(study_uid, int(prio))
    except (ValueError, GatewayError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    typer.echo(f"{study_uid}: {prio.label}")


@gateway_app.command("send")
def gateway_send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders.", exists=True)],
    to: Annotated[str, typer.Option("--to", help="AET@HOST:PORT")],
    calling_aet: Annotated[str, typer.Option(help="Our AE title.")] = "TELERAD_SCU",
) -> None:
    """Push DICOM files or folders to any peer (C-STORE SCU), with a progress bar."""
    from dicom_gateway import GatewayError
    from dicom_gateway.scu import iter_files, send_paths

    total = sum(1 for _ in iter_files(paths))
    with Progress(console=console) as progress:
        task = progress.add_task(f"sending to {to}", total=total)
        try:
            report = send_paths(
                paths, to, calling_aet=calling_aet, progress=lambda n: progress.advance(task, n)
            )
        except GatewayError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
    console.print(
        f"sent {report.sent} ({report.warnings} with warnings), failed {len(report.failed)}, "
        f"skipped {len(report.skipped)} non-DICOM files"
    )
    for path, why in report.skipped:
        console.print(f"  [yellow]skipped[/] {path}: {why}")
    for path, why in report.failed:
        console.print(f"  [red]failed[/] {path}: {why}")
    if report.failed:
        raise typer.Exit(1)


# -- hub ----------------------------------------------------------------------------------


@hub_app.command("serve")
def hub_serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port (upload protocol).")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM listener port.")] = None,
    aet: Annotated[str | None, typer.Option(help="Hub AE title.")] = None,
    archive: Annotated[str | None, typer.Option(help="filesystem or orthanc")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the hub: upload protocol over HTTP, DICOM listener, archive."""
    from telerad.hub import Hub

    _setup_logging(verbose)
    settings = _settings(
        HubSettings,
        config,
        data_dir=data_dir,
        http_port=http_port,
        dicom_port=dicom_port,
        aet=aet,
        archive=archive,
    )
    hub = Hub(settings)
    hub.start_dicom()
    hub.start_http(log_level="info" if verbose else "warning")
    deadline = time.monotonic() + 30
    while not hub.started and time.monotonic() < deadline:
        time.sleep(0.05)
    console.print(
        f"hub listening on http port {hub.http_port}"
        + (f", DICOM {settings.aet} port {hub.listener.port}" if settings.dicom_port >= 0 else "")
    )
    stop = threading.Event()
    _wait_forever(stop)
    hub.stop()


@station_app.command("add")
def station_add(name: str, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Register a station and print its token (shown once)."""
    from reading_queue import QueueError
    from telerad.hub import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    try:
        token = open_ingest(settings).add_station(name)
    except QueueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    typer.echo(token)


@station_app.command("list")
def station_list(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List registered stations."""
    from telerad.hub import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    stations = open_ingest(settings).list_stations()
    rows: list[dict[str, Any]] = [
        {"name": s.name, "active": s.active, "created_at": s.created_at} for s in stations
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(
            f"{r['name']}\t{'active' if r['active'] else 'revoked'}\t{_when(r['created_at'])}"
        )


@hub_app.command("studies")
def hub_studies(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Studies the hub holds: committed ones are ready for the reading queue."""
    from telerad.hub import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    studies = open_ingest(settings).studies()
    rows: list[dict[str, Any]] = [
        {
            "study_uid": s.study_uid,
            "station": s.station,
            "modality": s.modality,
            "priority": Priority(s.priority).label,
            "state": s.state,
            "instances": s.instance_count,
            "bytes": s.bytes,
            "first_received": s.first_received,
            "committed_at": s.committed_at,
            "commits": s.commit_count,
        }
        for s in studies
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(
        "Hub studies",
        ["study", "station", "mod", "prio", "state", "inst", "committed"],
        [
            [
                r["study_uid"],
                r["station"],
                r["modality"],
                r["priority"],
                r["state"],
                str(r["instances"]),
                _when(r["committed_at"]),
            ]
            for r in rows
        ],
    )


@hub_app.command("export")
def hub_export(
    args: Annotated[
        list[str], typer.Argument(metavar="STUDY_UID OUT_DIR | --all OUT_DIR", show_default=False)
    ],
    all_studies: Annotated[bool, typer.Option("--all", help="Every committed study.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Write committed studies' DICOM files back out: OUT_DIR/<study>/<series>/<sop>.dcm."""
    from telerad.hub import open_ingest

    if all_studies and len(args) == 1:
        study_uid, out_dir = None, Path(args[0])
    elif not all_studies and len(args) == 2:
        study_uid, out_dir = args[0], Path(args[1])
    else:
        console.print("[red]usage: telerad hub export (STUDY_UID | --all) OUT_DIR[/]")
        raise typer.Exit(2)
    settings = _settings(HubSettings, config, data_dir=data_dir)
    ingest = open_ingest(settings)
    if study_uid is None:
        uids = [s.study_uid for s in ingest.studies() if s.state == "committed"]
    else:
        uids = [study_uid]
        if not ingest.study_instances(study_uid):
            console.print(f"[red]no committed study {study_uid} at this hub[/]")
            raise typer.Exit(1)
    total = sum(ingest.export(uid, out_dir) for uid in uids)
    typer.echo(f"exported {total} instances of {len(uids)} studies to {out_dir}")


# -- samples ------------------------------------------------------------------------------


@samples_app.command("generate")
def samples_generate(
    out: Path,
    ct_slices: Annotated[int, typer.Option(help="Slices in the CT study.")] = 120,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 20261122,
) -> None:
    """Write the synthetic sample studies (CT + chest CR, Vietnamese and Khmer names)."""
    from sample_studies.generate import generate_samples

    with Progress(console=console) as progress:
        task = progress.add_task("generating samples", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        paths = generate_samples(out, ct_slices=ct_slices, seed=seed, progress=tick)
    typer.echo(f"wrote {len(paths)} files to {out}")


@app.command("demo")
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo keeps its state.")] = Path(
        "telerad-demo"
    ),
    ct_slices: Annotated[int, typer.Option(help="Slices in the sample CT.")] = 120,
    serve: Annotated[bool, typer.Option(help="Keep running after the samples arrived.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """A hub and a gateway on loopback with the sample studies flowing through them."""
    from telerad.demo import run_demo

    _setup_logging(verbose)
    sys.exit(run_demo(data_dir, ct_slices=ct_slices, serve=serve, console=console))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
