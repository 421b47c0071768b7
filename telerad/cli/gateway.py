"""``telerad gateway``: the station gateway (serve, status, priority, send)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from dicom_gateway.station.settings import GatewaySettings
from telerad.core.priority import Priority

if TYPE_CHECKING:
    pass

from telerad.cli.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    _fail,
    _print_table,
    _settings,
    _setup_logging,
    _wait_forever,
    _when,
    console,
)

gateway_app = typer.Typer(help="Station gateway: DICOM listener and store-and-forward.")


@gateway_app.command("serve")
def gateway_serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM listener port.")] = None,
    aet: Annotated[str | None, typer.Option(help="Our AE title.")] = None,
    hub_url: Annotated[str | None, typer.Option(help="Hub base URL (https://...).")] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Station token from the hub. Every user sees it in `ps`: prefer --token-file "
            "or TELERAD_TOKEN."
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="File holding the station token (mode 0600)."),
    ] = None,
    insecure_http: Annotated[
        bool | None,
        typer.Option(
            "--insecure-http",
            help="Allow an http:// hub URL outside loopback (token and studies unencrypted).",
            show_default=False,
        ),
    ] = None,
    http_port: Annotated[int | None, typer.Option(help="/healthz and /metrics port.")] = None,
    quiet_period_s: Annotated[
        float | None, typer.Option(help="Seconds of silence that complete a study.")
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the station gateway: durable C-STORE listener and forwarders to the hub and PACS."""
    from dicom_gateway.station.service import Gateway

    _setup_logging(verbose)
    if token is not None:
        console.print(
            "[yellow]warning:[/] --token is visible to every user of this machine (ps, "
            "/proc); use --token-file PATH or TELERAD_TOKEN instead",
            highlight=False,
        )
    settings = _settings(
        GatewaySettings,
        config,
        data_dir=data_dir,
        dicom_port=dicom_port,
        aet=aet,
        hub_url=hub_url,
        token=token,
        token_file=token_file,
        insecure_http=insecure_http,
        http_port=http_port,
        quiet_period_s=quiet_period_s,
    )
    try:
        gw = Gateway(settings)
    except ValueError as exc:  # e.g. a hub URL without a token, unusable TLS files
        _fail(f"configuration error: {exc}", 2)
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
    from dicom_gateway.durable.state import StateDB
    from dicom_gateway.station.service import gateway_status, quarantine_list

    settings = _settings(GatewaySettings, config, data_dir=data_dir)
    db_path = settings.data_dir / "gateway.sqlite3"
    if not db_path.exists():
        console.print(f"[red]no gateway state in {settings.data_dir}[/]")
        raise typer.Exit(1)
    state = StateDB(db_path)
    status = gateway_status(
        state, settings.quiet_period_s, release_settle_s=settings.release_settle_s
    )
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
    held = [a for a in status["attention"] if a["held_at"] is not None]
    if held:
        _print_table(
            "Needs attention (after a fix: telerad gateway retry STUDY_UID)",
            ["study", "destination", "refusals", "since", "reason"],
            [
                [
                    a["study_uid"],
                    a["destination"],
                    str(a["refusals"]),
                    _when(a["held_at"]),
                    a["reason"],
                ]
                for a in held
            ],
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
    from dicom_gateway.durable.state import StateDB

    settings = _settings(GatewaySettings, config, data_dir=data_dir)
    try:
        prio = Priority.parse(priority)
        StateDB(settings.data_dir / "gateway.sqlite3").set_priority(study_uid, int(prio))
    except (ValueError, GatewayError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    typer.echo(f"{study_uid}: {prio.label}")


@gateway_app.command("retry")
def gateway_retry(study_uid: str, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Send a study that needs attention (or has failed instances) again, after a fix."""
    from dicom_gateway import GatewayError
    from dicom_gateway.durable.state import StateDB

    settings = _settings(GatewaySettings, config, data_dir=data_dir)
    try:
        changed = StateDB(settings.data_dir / "gateway.sqlite3").retry_study(study_uid)
    except GatewayError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if not changed:
        typer.echo(f"{study_uid}: nothing held back; it is sent as usual")
        return
    typer.echo(f"{study_uid}: sent again at the next turn")


@gateway_app.command("send")
def gateway_send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders.", exists=True)],
    to: Annotated[str, typer.Option("--to", help="AET@HOST:PORT")],
    calling_aet: Annotated[str, typer.Option(help="Our AE title.")] = "TELERAD_SCU",
) -> None:
    """Push DICOM files or folders to any peer (C-STORE SCU), with a progress bar."""
    from dicom_gateway import GatewayError
    from dicom_gateway.station.scu import iter_files, send_paths

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
