"""telerad: teleradiology store-and-forward (station gateway and hub).

Every option is also a TELERAD_<NAME> environment variable and a key of the TOML file given
with --config (tables "gateway" and "hub"); the command line wins over the environment, which
wins over the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from telerad import __version__
from telerad.config import GatewaySettings, HubSettings, Priority

if TYPE_CHECKING:
    from reading_queue.engine import Decision
    from reading_queue.ingest import IngestService
    from reading_queue.models import Study
    from reading_queue.roster import Roster
    from reading_queue.worklist import ReaderStatus, Worklist

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
gateway_app = typer.Typer(help="Station gateway: DICOM listener and store-and-forward.")
hub_app = typer.Typer(help="Hub: receives station uploads and DICOM, keeps the archive.")
station_app = typer.Typer(
    help="Stations allowed to upload to this hub, and their reading profiles.",
    no_args_is_help=True,
)
radiologist_app = typer.Typer(
    help="Radiologists: what they read, where they are licensed, shifts, capacity.",
    no_args_is_help=True,
)
roster_app = typer.Typer(
    help="Roster files (YAML or TOML): radiologists and stations in one file.",
    no_args_is_help=True,
)
study_app = typer.Typer(
    help="One study on the worklist: history, admin changes, the radiologist's steps.",
    no_args_is_help=True,
)
samples_app = typer.Typer(help="Synthetic sample studies.")
app.add_typer(gateway_app, name="gateway")
app.add_typer(hub_app, name="hub")
hub_app.add_typer(station_app, name="station")
hub_app.add_typer(radiologist_app, name="radiologist")
hub_app.add_typer(roster_app, name="roster")
hub_app.add_typer(study_app, name="study")
app.add_typer(samples_app, name="samples")

console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file (\\[gateway], \\[hub] tables).")
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


# -- hub: reading queue -------------------------------------------------------------------
#
# Privacy: listings show UIDs, accession numbers, stations and radiologist keys, never a
# patient's name, ID or birth date (the worklist keeps them for priors and stickiness only).


def _fail(message: str, code: int = 1) -> NoReturn:
    """One red message on stderr (never a traceback), then exit with ``code``."""
    console.print(f"[red]{escape(message)}[/]", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@contextmanager
def _queue_errors() -> Iterator[None]:
    """Domain failures (unknown study, someone was faster, not eligible...) exit 1."""
    from reading_queue import QueueError

    try:
        yield
    except QueueError as exc:
        _fail(str(exc), 1)


#: pydantic field -> the option that sets it, so messages name what the user typed
_OPTION_OF = {
    "key": "KEY",
    "name": "--name",
    "modalities": "--modality",
    "subspecialties": "--subspecialty",
    "licences": "--licence",
    "languages": "--language",
    "timezone": "--timezone",
    "shifts": "--shift",
    "max_concurrent": "--max-concurrent",
    "rvu_per_hour": "--rvu-per-hour",
    "institution": "--institution",
    "jurisdiction": "--jurisdiction",
    "language": "--language",
    "preferred": "--prefer",
    "excluded": "--exclude",
    "sla_minutes": "--sla",
    "pacs": "--pacs",
}


def _validation_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if loc:
            msg = msg.removeprefix(f"{loc[0]}: ")
            loc[0] = _OPTION_OF.get(loc[0], loc[0])
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts)


_M = TypeVar("_M", bound=BaseModel)


def _validated(model: type[_M], data: dict[str, Any], what: str) -> _M:
    """Build ``model`` from ``data``; invalid input is one red line and exit 2."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        _fail(f"invalid {what}: {_validation_text(exc)}", 2)


def _split(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated values; None when the option was not given, [] for ''."""
    if values is None:
        return None
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def _actor(actor: str | None) -> str:
    who = (actor or os.environ.get("USER") or "admin").strip() or "admin"
    if len(who) > 50:
        _fail(f"--actor {who[:20]}...: at most 50 characters", 2)
    return who


def _open_ingest(settings: HubSettings) -> IngestService:
    from telerad.hub import open_ingest

    return open_ingest(settings)


def _open_queue(settings: HubSettings) -> tuple[IngestService, Worklist]:
    """The hub's ingest service and worklist, as the running hub opens them, except that a
    configured ``roster_file`` is not seeded here: seeding is the hub's job at its first
    start (`telerad hub roster load` applies a file on purpose)."""
    from telerad.hub import open_ingest, open_worklist

    ingest = open_ingest(settings)
    return ingest, open_worklist(settings.model_copy(update={"roster_file": None}), ingest)


def _worklist(config: Path | None, data_dir: Path | None) -> Worklist:
    settings = _settings(HubSettings, config, data_dir=data_dir)
    return _open_queue(settings)[1]


def _csv(values: Iterable[str]) -> str:
    return ",".join(values) or "-"


def _sla_text(sla: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sla.items()) or "-"


def _minutes_left(deadline: float, now: float) -> float:
    return round((deadline - now) / 60.0, 1)


def _check_radiologists(worklist: Worklist, keys: Iterable[str]) -> None:
    wanted = set(keys)
    if not wanted:
        return
    known = {r.key for r in worklist.radiologists()}
    unknown = sorted(wanted - known)
    if unknown:
        _fail(f"unknown radiologists {', '.join(unknown)} (add them first)", 2)


# -- radiologists ---------------------------------------------------------------------------

KeyArg = Annotated[str, typer.Argument(help="Radiologist key.")]
RNameOpt = Annotated[str | None, typer.Option("--name", help="Full name, for admins.")]
ModalityOpt = Annotated[
    list[str] | None,
    typer.Option("--modality", help="Modality they read (CT, CR, MR...); repeat or a,b."),
]
SubspecialtyOpt = Annotated[
    list[str] | None,
    typer.Option("--subspecialty", help="Subspecialty (neuro, msk, breast); repeat or a,b."),
]
LicenceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--licence",
        "--license",
        help="Jurisdiction they are licensed in: VN (the country) or VN-HN, KH-12 (a "
        "province); repeat or a,b.",
    ),
]
RLanguageOpt = Annotated[
    list[str] | None,
    typer.Option("--language", help="Report language (vi, km, en); repeat or a,b."),
]
TimezoneOpt = Annotated[
    str | None, typer.Option("--timezone", help="IANA time zone of their shifts.")
]
ShiftOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shift",
        help="Weekly shift in their time zone, e.g. 'mon-fri 07:00-15:00' or "
        "'sat 00:00-24:00 on-call'; repeat.",
    ),
]
MaxConcurrentOpt = Annotated[
    int | None, typer.Option("--max-concurrent", help="Studies they may hold at once.")
]
RvuOpt = Annotated[
    float | None, typer.Option("--rvu-per-hour", help="Reading speed in RVU per hour.")
]


def _radiologist_update(
    name: str | None,
    modality: list[str] | None,
    subspecialty: list[str] | None,
    licence: list[str] | None,
    language: list[str] | None,
    timezone: str | None,
    shift: list[str] | None,
    max_concurrent: int | None,
    rvu_per_hour: float | None,
) -> dict[str, Any]:
    """The fields given on the command line (shifts parsed; a bad one exits 2)."""
    from reading_queue.roster import ShiftSpec

    update: dict[str, Any] = {
        "name": name,
        "modalities": _split(modality),
        "subspecialties": _split(subspecialty),
        "licences": _split(licence),
        "languages": _split(language),
        "timezone": timezone,
        "max_concurrent": max_concurrent,
        "rvu_per_hour": rvu_per_hour,
    }
    if shift is not None:
        shifts = []
        for text in shift:
            if not text.strip():
                continue  # --shift '' clears the shifts
            try:
                shifts.append(ShiftSpec.parse(text).model_dump())
            except ValidationError as exc:
                _fail(f"invalid --shift {text!r}: {_validation_text(exc)}", 2)
            except ValueError as exc:
                _fail(f"invalid --shift {text!r}: {exc}", 2)
        update["shifts"] = shifts
    return {k: v for k, v in update.items() if v is not None}


def _shift_state(status: ReaderStatus) -> str:
    if status.on_shift:
        return "on_shift"
    if status.on_call:
        return "on_call"
    return "off"


def _shift_text(status: ReaderStatus) -> str:
    from zoneinfo import ZoneInfo

    state = _shift_state(status)
    if state == "off" or status.shift_ends_at is None:
        return "off"
    end = datetime.fromtimestamp(status.shift_ends_at, ZoneInfo(status.spec.timezone))
    return f"{state.replace('_', ' ')} until {end.strftime('%a %H:%M')}"


def _radiologist_row(status: ReaderStatus) -> dict[str, Any]:
    spec = status.spec
    return {
        "key": spec.key,
        "name": spec.name,
        "modalities": spec.modalities,
        "subspecialties": spec.subspecialties,
        "licences": spec.licences,
        "languages": spec.languages,
        "timezone": spec.timezone,
        "shifts": [sh.label() for sh in spec.shifts],
        "shift_state": _shift_state(status),
        "shift_ends_at": status.shift_ends_at,
        "open_studies": status.open_count,
        "open_rvu": round(status.open_rvu, 2),
        "max_concurrent": spec.max_concurrent,
        "rvu_per_hour": spec.rvu_per_hour,
        "active": spec.active,
    }


@radiologist_app.command("add")
def radiologist_add(
    key: KeyArg,
    name: RNameOpt = None,
    modality: ModalityOpt = None,
    subspecialty: SubspecialtyOpt = None,
    licence: LicenceOpt = None,
    language: RLanguageOpt = None,
    timezone: TimezoneOpt = None,
    shift: ShiftOpt = None,
    max_concurrent: MaxConcurrentOpt = None,
    rvu_per_hour: RvuOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Add a radiologist (at least one --modality and one --licence).

    Example: telerad hub radiologist add dr.lan --name "Dr Lan" --modality CT --modality CR
    --licence VN --language vi --shift "mon-fri 07:00-15:00" --max-concurrent 4
    """
    from reading_queue.roster import RadiologistSpec

    update = _radiologist_update(
        name,
        modality,
        subspecialty,
        licence,
        language,
        timezone,
        shift,
        max_concurrent,
        rvu_per_hour,
    )
    base: dict[str, Any] = {"key": key, "modalities": [], "licences": []}
    spec = _validated(RadiologistSpec, {**base, **update}, f"radiologist {key}")
    worklist = _worklist(config, data_dir)
    if key in {r.key for r in worklist.radiologists()}:
        _fail(f"radiologist {key!r} already exists: change it with `radiologist set`", 1)
    with _queue_errors():
        worklist.upsert_radiologist(spec)
    typer.echo(f"radiologist {spec.key} added")


@radiologist_app.command("set")
def radiologist_set(
    key: KeyArg,
    name: RNameOpt = None,
    modality: ModalityOpt = None,
    subspecialty: SubspecialtyOpt = None,
    licence: LicenceOpt = None,
    language: RLanguageOpt = None,
    timezone: TimezoneOpt = None,
    shift: ShiftOpt = None,
    max_concurrent: MaxConcurrentOpt = None,
    rvu_per_hour: RvuOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Change a radiologist; only the options given change (a list option replaces the list,
    an empty value such as --shift '' clears it). A lower capacity takes effect at the next
    round: studies they have not opened go back to the pool."""
    from reading_queue.roster import RadiologistSpec

    update = _radiologist_update(
        name,
        modality,
        subspecialty,
        licence,
        language,
        timezone,
        shift,
        max_concurrent,
        rvu_per_hour,
    )
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        current = worklist.radiologist(key)
    # Re-validate the merged fields (model_copy(update=...) would not validate them).
    spec = _validated(RadiologistSpec, {**current.model_dump(), **update}, f"radiologist {key}")
    if spec == current:
        console.print(f"radiologist {escape(key)}: unchanged")
        return
    with _queue_errors():
        worklist.upsert_radiologist(spec)
    changed = sorted(k for k in update if getattr(spec, k) != getattr(current, k))
    typer.echo(f"radiologist {key}: updated {', '.join(changed)}")


@radiologist_app.command("list")
def radiologist_list(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Radiologists: what they read, licences, languages, on shift / on call / off now,
    open studies against their capacity."""
    worklist = _worklist(config, data_dir)
    statuses = {st.spec.key: st for st in worklist.roster_status()}
    rows = [_radiologist_row(st) for st in statuses.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    _print_table(
        "Radiologists",
        ["key", "modalities", "subspec.", "licences", "lang", "now", "open", "active"],
        [
            [
                r["key"],
                _csv(r["modalities"]),
                _csv(r["subspecialties"]),
                _csv(r["licences"]),
                _csv(r["languages"]),
                _shift_text(statuses[r["key"]]),
                f"{r['open_studies']}/{r['max_concurrent']}",
                "yes" if r["active"] else "no",
            ]
            for r in rows
        ],
    )


@radiologist_app.command("show")
def radiologist_show(
    key: KeyArg, config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """One radiologist in full, with their shifts and current load."""
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.radiologist(key)
    (status,) = [st for st in worklist.roster_status() if st.spec.key == key]
    row = _radiologist_row(status)
    if as_json:
        typer.echo(json.dumps(row, indent=2, ensure_ascii=False))
        return
    lines = [
        ("key", row["key"]),
        ("name", row["name"] or "-"),
        ("active", "yes" if row["active"] else "no"),
        ("modalities", _csv(row["modalities"])),
        ("subspecialties", _csv(row["subspecialties"])),
        ("licences", _csv(row["licences"])),
        ("languages", _csv(row["languages"])),
        ("timezone", row["timezone"]),
        ("now", _shift_text(status)),
        ("open", f"{row['open_studies']} of {row['max_concurrent']} ({row['open_rvu']} RVU)"),
        ("rvu/hour", f"{row['rvu_per_hour']:g}"),
    ]
    for label, value in lines:
        typer.echo(f"{label + ':':<16}{value}")
    typer.echo("shifts:" if row["shifts"] else f"{'shifts:':<16}none (never on shift)")
    for label in row["shifts"]:
        typer.echo(f"  {label}")


def _set_active(key: str, active: bool, config: Path | None, data_dir: Path | None) -> None:
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.set_radiologist_active(key, active)


@radiologist_app.command("deactivate")
def radiologist_deactivate(
    key: KeyArg, config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Stop giving a radiologist studies; those they have not opened go back to the pool at
    the next round."""
    _set_active(key, False, config, data_dir)
    typer.echo(f"radiologist {key} deactivated")


@radiologist_app.command("activate")
def radiologist_activate(
    key: KeyArg, config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Give a deactivated radiologist studies again (during their shifts)."""
    _set_active(key, True, config, data_dir)
    typer.echo(f"radiologist {key} activated")


# -- stations: profile options ------------------------------------------------------------

InstitutionOpt = Annotated[
    str | None, typer.Option("--institution", help="Institution name (reports, listings).")
]
JurisdictionOpt = Annotated[
    str | None,
    typer.Option(
        "--jurisdiction", help="Where its studies are read under: VN, VN-HN, KH-12 (ISO 3166)."
    ),
]
StationLanguageOpt = Annotated[
    str | None, typer.Option("--language", help="Language of its reports (vi, km, en).")
]
PreferOpt = Annotated[
    list[str] | None,
    typer.Option("--prefer", help="Radiologist the station prefers; repeat or a,b."),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", help="Radiologist who never reads its studies; repeat or a,b."),
]
SlaOpt = Annotated[
    list[str] | None,
    typer.Option("--sla", help="Contract SLA in minutes, e.g. stat=20 or urgent=120; repeat."),
]
PacsOpt = Annotated[
    list[str] | None,
    typer.Option("--pacs", help="PACS that gets its reports: NAME=AET@HOST:PORT; repeat."),
]

_PACS = re.compile(r"^([^=]+)=([^@]+)@(.+):(\d{1,5})$")


def _station_update(
    institution: str | None,
    jurisdiction: str | None,
    language: str | None,
    prefer: list[str] | None,
    exclude: list[str] | None,
    sla: list[str] | None,
    pacs: list[str] | None,
) -> dict[str, Any]:
    """The profile fields given on the command line (``--sla``/``--pacs`` parsed)."""
    update: dict[str, Any] = {
        "institution": institution,
        "jurisdiction": jurisdiction,
        "language": language,
        "preferred": _split(prefer),
        "excluded": _split(exclude),
    }
    if sla is not None:
        minutes: dict[str, Any] = {}
        for item in _split(sla) or []:
            prio, sep, value = item.partition("=")
            try:
                minutes[prio.strip().lower()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                _fail(f"invalid --sla {item!r}: write it as PRIORITY=MINUTES, e.g. stat=20", 2)
        update["sla_minutes"] = minutes
    if pacs is not None:
        dests = []
        for item in pacs:
            if not item.strip():
                continue  # --pacs '' clears the list
            m = _PACS.match(item.strip())
            if not m:
                _fail(f"invalid --pacs {item!r}: write it as NAME=AET@HOST:PORT", 2)
            dests.append({"name": m[1], "aet": m[2], "host": m[3].strip("[]"), "port": int(m[4])})
        update["pacs"] = dests
    return {k: v for k, v in update.items() if v is not None}


# -- roster files -------------------------------------------------------------------------


def _roster_text(roster: Roster, suffix: str) -> str:
    data = roster.model_dump(mode="json")
    if suffix == ".toml":
        try:
            import tomli_w
        except ImportError:
            _fail("writing TOML needs the tomli-w package (pip install tomli-w), or use .yaml", 1)
        return tomli_w.dumps(data)
    import yaml

    return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100))


@roster_app.command("load")
def roster_load(
    file: Annotated[Path, typer.Argument(help="Roster file: .yaml, .yml or .toml.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create or update the radiologists and stations of a roster file (see
    deploy/roster.example.yaml); prints the token of every station it creates, once."""
    from reading_queue.roster import load_roster

    with _queue_errors():
        roster = load_roster(file)
    worklist = _worklist(config, data_dir)
    before_r = {r.key: r for r in worklist.radiologists()}
    named = {k for st in roster.stations for k in (*st.preferred, *st.excluded)}
    unknown = sorted(named - set(before_r) - {r.key for r in roster.radiologists})
    if unknown:
        _fail(f"{file}: stations name unknown radiologists {', '.join(unknown)}", 1)
    before_s = {s.name: s for s in worklist.stations()}
    with _queue_errors():
        tokens = worklist.load_roster(roster)
    for r in roster.radiologists:
        old = before_r.get(r.key)
        what = "created" if old is None else ("unchanged" if old == r else "updated")
        typer.echo(f"radiologist {r.key}: {what}")
    for st in roster.stations:
        if st.name in tokens:
            typer.echo(f"station {st.name}: created, token {tokens[st.name]}")
        else:
            what = "unchanged" if before_s.get(st.name) == st else "updated"
            typer.echo(f"station {st.name}: {what}")
    if tokens:
        console.print("tokens are shown once: give each to its station's gateway")


@roster_app.command("export")
def roster_export(
    file: Annotated[Path, typer.Argument(help="Where to write: .yaml, .yml or .toml.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Write the current radiologists and stations as a roster file (YAML or TOML by the
    file's suffix) that `roster load` reads back as is. Tokens are not exported."""
    from reading_queue.roster import Roster
    from telerad.fileio import write_atomic

    suffix = file.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        _fail(f"{file}: use a .yaml, .yml or .toml file name", 2)
    worklist = _worklist(config, data_dir)
    roster = Roster(radiologists=worklist.radiologists(), stations=worklist.stations())
    text = _roster_text(roster, suffix)
    try:
        write_atomic(file, text.encode(), file.parent)
    except OSError as exc:
        _fail(f"cannot write {file}: {exc.strerror}", 1)
    typer.echo(
        f"wrote {len(roster.radiologists)} radiologists and {len(roster.stations)} stations "
        f"to {file}"
    )


# -- the worklist -------------------------------------------------------------------------

_ACTIVE_STATES = ("received", "ready", "assigned", "in_progress", "preliminary")
_ALL_STATES = (*_ACTIVE_STATES, "final", "cancelled")


def _study_row(st: Study, now: float) -> dict[str, Any]:
    """What listings may show of a study: no patient name, ID or birth date."""
    done = st.state in ("final", "cancelled")
    return {
        "study_uid": st.study_uid,
        "accession": st.accession,
        "station": st.station,
        "modality": st.modality,
        "body_part": st.body_part,
        "subspecialty": st.subspecialty,
        "rvu": st.rvu,
        "priority": Priority(st.priority).label,
        "state": st.state,
        "assignee": st.assignee,
        "received_at": st.received_at,
        "deadline": st.deadline,
        "minutes_left": None if done else _minutes_left(st.deadline, now),
        "lease_expires_at": st.lease_expires_at,
        "escalated": st.escalated_at is not None,
        "instances": st.instance_count,
        "late_instances": st.late_instances,
        "merged_into": st.merged_into,
    }


def _notes(row: dict[str, Any]) -> str:
    notes = []
    if row["escalated"]:
        notes.append("escalated")
    if row["late_instances"]:
        notes.append(f"+{row['late_instances']} late instances")
    if row["merged_into"]:
        notes.append(f"merged into {row['merged_into']}")
    return "; ".join(notes) or "-"


@hub_app.command("worklist")
def hub_worklist(
    radiologist: Annotated[
        str | None, typer.Option("--radiologist", help="Only studies held by this radiologist.")
    ] = None,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help=f"Only these states ({', '.join(_ALL_STATES)}); repeat."),
    ] = None,
    all_states: Annotated[
        bool, typer.Option("--all", help="Also final and cancelled studies.")
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Studies on the reading worklist, most urgent deadline first (default: not yet final
    nor cancelled). Minutes left is negative when the study is overdue."""
    states = _split(state)
    if states:
        bad = sorted(set(states) - set(_ALL_STATES))
        if bad:
            _fail(f"unknown --state {', '.join(bad)}: use {', '.join(_ALL_STATES)}", 2)
    elif not all_states:
        states = list(_ACTIVE_STATES)
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.consume_events()
        studies = worklist.studies(states=states or None, radiologist=radiologist)
    now = time.time()
    rows = [_study_row(st, now) for st in studies]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    _print_table(
        "Worklist",
        [
            "study",
            "accession",
            "station",
            "mod/part",
            "prio",
            "state",
            "assignee",
            "deadline (UTC)",
            "min left",
            "notes",
        ],
        [
            [
                r["study_uid"],
                r["accession"] or "-",
                r["station"] or "-",
                f"{r['modality'] or '?'}/{r['body_part'] or '-'}",
                r["priority"],
                r["state"],
                r["assignee"] or "-",
                _when(r["deadline"]),
                "-" if r["minutes_left"] is None else f"{r['minutes_left']:.0f}",
                _notes(r),
            ]
            for r in rows
        ],
    )


def _decision_row(d: Decision) -> dict[str, Any]:
    return {
        "kind": d.kind.value,
        "study_uid": d.study_uid,
        "radiologist": d.radiologist,
        "previous": d.previous,
        "reasons": list(d.reasons),
        "lease_expires_at": d.lease_expires_at,
    }


@hub_app.command("round")
def hub_round(
    explain: Annotated[
        bool, typer.Option("--explain", help="Also say why each waiting study waits.")
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one worklist round now, as the hub does every few seconds: take in newly committed
    studies, release lapsed leases, escalate, and (push mode) assign, each with its reasons."""
    settings = _settings(HubSettings, config, data_dir=data_dir)
    _, worklist = _open_queue(settings)
    with _queue_errors():
        intake = worklist.consume_events()
        result = worklist.run_round(explain=explain, assign=settings.assignment_mode == "push")
    decisions = [_decision_row(d) for d in result.decisions]
    if as_json:
        out = {
            "new_studies": intake,
            "assigned": result.assigned,
            "reassigned": result.reassigned,
            "released": result.released,
            "escalated": result.escalated,
            "decisions": decisions,
            "waiting": result.waiting,
        }
        typer.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    for d in decisions:
        who = d["radiologist"] or "-"
        if d["previous"]:
            who = f"{d['previous']} -> {who}"
        typer.echo(f"{d['kind']}\t{d['study_uid']}\t{who}\t{'; '.join(d['reasons'])}")
    for uid, why in result.waiting.items():
        typer.echo(f"wait\t{uid}\t-\t{why}")
    console.print(
        f"round: {intake} new studies, {result.assigned} assigned, {result.reassigned} "
        f"reassigned, {result.released} released, {result.escalated} escalated"
        + ("" if settings.assignment_mode == "push" else " (pull mode: no assignments)"),
        soft_wrap=True,
        highlight=False,
    )


@hub_app.command("claim")
def hub_claim(
    radiologist: Annotated[str, typer.Argument(help="Radiologist key.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pull mode: give RADIOLOGIST the most urgent study they may read and print its UID and
    why; prints nothing to stdout (exit 0) when there is nothing for them."""
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.consume_events()
        decision = worklist.claim_next(radiologist)
    if decision is None:
        if as_json:
            typer.echo("null")
        why = ""
        (status,) = [s for s in worklist.roster_status() if s.spec.key == radiologist]
        if not status.spec.active:
            why = f" ({radiologist} is deactivated)"
        elif not (status.on_shift or status.on_call):
            why = f" ({radiologist} is off shift)"
        elif status.open_count >= status.spec.max_concurrent:
            why = f" ({radiologist} holds {status.open_count}, their maximum)"
        console.print(f"nothing to read{escape(why)}", soft_wrap=True)
        return
    if as_json:
        typer.echo(json.dumps(_decision_row(decision), indent=2, ensure_ascii=False))
        return
    typer.echo(decision.study_uid)
    for reason in decision.reasons:
        typer.echo(f"  {reason}")


@hub_app.command("simulate")
def hub_simulate(
    roster: Annotated[
        Path | None,
        typer.Option(help="Roster file (YAML/TOML, the seed format); default: this hub's roster."),
    ] = None,
    arrivals: Annotated[
        Path | None, typer.Option(help="Arrivals CSV (docs/worklist-simulation.md).")
    ] = None,
    synthetic: Annotated[
        bool, typer.Option("--synthetic", help="A generated day instead of --arrivals.")
    ] = False,
    date: Annotated[str, typer.Option(help="Day of the synthetic arrivals.")] = "2026-11-23",
    studies_per_station: Annotated[
        float, typer.Option(help="Synthetic volume per station and day.")
    ] = 9.0,
    seed: Annotated[int, typer.Option(help="Random seed (arrivals, reading times).")] = 1,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the table as JSON.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Plot turnaround distributions (PNG).")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Does this roster keep our SLAs? Replays arrivals against the roster with telerad's
    engine, FIFO pull and round-robin push, using this hub's SLA policy, and prints the table."""
    from zoneinfo import ZoneInfo

    from reading_queue import QueueError
    from reading_queue.roster import Roster, load_roster
    from reading_queue.simulate import PEAK_TZ, compare, dump_json, load_arrivals, synthetic_day

    if (arrivals is None) == (not synthetic):
        _fail("give either --arrivals FILE or --synthetic", 2)
    settings = _settings(HubSettings, config, data_dir=data_dir)
    with _queue_errors():
        if roster is not None:
            plan = load_roster(roster)
        else:
            wl = _worklist(config, data_dir)
            plan = Roster(radiologists=wl.radiologists(), stations=wl.stations())
            if not plan.radiologists:
                _fail("this hub has no radiologists yet: pass --roster FILE", 2)
        if arrivals is not None:
            days = load_arrivals(arrivals, plan)
        else:
            try:
                day = datetime.fromisoformat(date).date()
            except ValueError:
                _fail(f"--date {date!r}: use YYYY-MM-DD", 2)
            start = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(PEAK_TZ))
            days = synthetic_day(
                plan, seed=seed, start=start, studies_per_station=studies_per_station
            )
        if not days:
            _fail("no arrivals to simulate", 2)
        try:
            report = compare(plan, days, settings.queue_policy, seed)
        except QueueError:
            raise
    typer.echo(report.table())
    if json_out is not None:
        dump_json(report, json_out)
        console.print(f"wrote {json_out}")
    if plot is not None:
        report.plot(plot)
        console.print(f"wrote {plot}")


# -- one study ----------------------------------------------------------------------------

UidArg = Annotated[str, typer.Argument(help="Study Instance UID.")]
ActorOpt = Annotated[
    str | None,
    typer.Option("--actor", help="Who does it, for the history (default: $USER, else admin)."),
]


def _detail_text(detail: dict[str, Any]) -> str:
    parts: list[str] = []
    for key, value in detail.items():
        if value in ("", None, []):
            continue
        if key == "reasons":
            parts.extend(str(v) for v in value)
        elif key == "deadline" and isinstance(value, int | float):
            parts.append(f"deadline {_when(value)} UTC")
        elif key == "reason":
            parts.append(f"reason: {value}")
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts)


@study_app.command("history")
def study_history(
    uid: UidArg, config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Every transition of a study, oldest first: who, when, from/to state and why."""
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.consume_events()
        worklist.study(uid)
        events = worklist.history(uid)
    rows: list[dict[str, Any]] = [
        {
            "at": e.at,
            "kind": e.kind,
            "from_state": e.from_state,
            "to_state": e.to_state,
            "radiologist": e.radiologist,
            "actor": e.actor,
            "detail": e.detail,
        }
        for e in events
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    _print_table(
        f"History of {uid}",
        ["when (UTC)", "event", "state", "radiologist", "by", "details"],
        [
            [
                _when(r["at"]),
                r["kind"],
                f"{r['from_state'] or '-'} -> {r['to_state']}",
                r["radiologist"] or "-",
                r["actor"],
                _detail_text(r["detail"]) or "-",
            ]
            for r in rows
        ],
    )


@study_app.command("assign")
def study_assign(
    uid: UidArg,
    radiologist: KeyArg,
    force: Annotated[
        bool, typer.Option("--force", help="Even if they may not read it (recorded).")
    ] = False,
    actor: ActorOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Give a study that is not yet reported to RADIOLOGIST (an admin's manual assignment);
    refused with the reason when they may not read it, unless --force."""
    who = _actor(actor)
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.reassign(uid, radiologist, actor=who, force=force)
        last = worklist.history(uid)[-1]
    reasons = last.detail.get("reasons", [])
    typer.echo(f"{uid}: assigned to {radiologist} ({'; '.join(reasons)})")


@study_app.command("priority")
def study_priority(
    uid: UidArg,
    priority: Annotated[str, typer.Argument(help="stat, urgent or routine")],
    actor: ActorOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Change a study's priority; its deadline is recomputed from when it was received (with
    the station's contract SLA)."""
    try:
        prio = Priority.parse(priority)
    except ValueError as exc:
        _fail(str(exc), 2)
    who = _actor(actor)
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        deadline = worklist.set_priority(uid, prio, actor=who)
    left = _minutes_left(deadline, time.time())
    typer.echo(
        f"{uid}: {prio.label}, deadline {_when(deadline)} UTC "
        + (f"({left:.0f} min left)" if left >= 0 else f"(overdue by {-left:.0f} min)")
    )


@study_app.command("cancel")
def study_cancel(
    uid: UidArg,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (duplicate, wrong patient, sent by mistake).")
    ],
    actor: ActorOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Take a study off the worklist (it stays in the archive and in the history)."""
    if not reason.strip():
        _fail("--reason must say why the study is cancelled", 2)
    who = _actor(actor)
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.cancel(uid, actor=who, reason=reason.strip())
    typer.echo(f"{uid}: cancelled")


@study_app.command("merge")
def study_merge(
    source: Annotated[str, typer.Argument(help="UID the late series arrived under.")],
    target: Annotated[str, typer.Argument(help="UID of the study they belong to.")],
    actor: ActorOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Read late series that came under a new Study Instance UID with TARGET: SOURCE leaves the
    worklist, TARGET's reader is told of the added instances. The archive is not changed."""
    who = _actor(actor)
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.consume_events()
        worklist.merge(source, target, actor=who)
        st = worklist.study(target)
    typer.echo(f"{source}: merged into {target} ({st.instance_count} instances, {st.state})")


@study_app.command("open")
def study_open(
    uid: UidArg, radiologist: KeyArg, config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """RADIOLOGIST opens a study assigned to them (assigned -> in progress); again on a study
    in progress renews the lease."""
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.open_study(uid, radiologist)
        st = worklist.study(uid)
    typer.echo(f"{uid}: {st.state} ({radiologist}), lease until {_when(st.lease_expires_at)} UTC")


@study_app.command("release")
def study_release(
    uid: UidArg,
    radiologist: KeyArg,
    reason: Annotated[str, typer.Option("--reason", help="Why, e.g. outside my competence.")] = "",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """RADIOLOGIST hands a study back to the pool."""
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.release(uid, radiologist, reason.strip())
    typer.echo(f"{uid}: released by {radiologist}, back in the pool")


@study_app.command("preliminary")
def study_preliminary(
    uid: UidArg, radiologist: KeyArg, config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """RADIOLOGIST records a preliminary report of a study in progress."""
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.submit_preliminary(uid, radiologist)
    typer.echo(f"{uid}: preliminary ({radiologist})")


@study_app.command("final")
def study_final(
    uid: UidArg, radiologist: KeyArg, config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """RADIOLOGIST records the final report of a study in progress or preliminary."""
    worklist = _worklist(config, data_dir)
    with _queue_errors():
        worklist.finalize(uid, radiologist)
        st = worklist.study(uid)
    late = (st.reported_at or 0.0) - st.deadline
    typer.echo(
        f"{uid}: final ({radiologist}), "
        + (
            f"{-late / 60:.0f} min before the deadline"
            if late <= 0
            else f"{late / 60:.0f} min after the deadline"
        )
    )


@station_app.command("add")
def station_add(
    name: str,
    institution: InstitutionOpt = None,
    jurisdiction: JurisdictionOpt = None,
    language: StationLanguageOpt = None,
    prefer: PreferOpt = None,
    exclude: ExcludeOpt = None,
    sla: SlaOpt = None,
    pacs: PacsOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Register a station and print its token (shown once), with its reading profile.

    Example: telerad hub station add tram-1 --jurisdiction VN-HN --language vi
    --sla stat=20 --prefer dr.lan --pacs BVBM=BVBM_PACS@10.0.0.5:104
    """
    from reading_queue.roster import StationSpec

    update = _station_update(institution, jurisdiction, language, prefer, exclude, sla, pacs)
    spec = _validated(StationSpec, {"name": name, **update}, f"station {name}")
    settings = _settings(HubSettings, config, data_dir=data_dir)
    ingest, worklist = _open_queue(settings)
    _check_radiologists(worklist, spec.preferred + spec.excluded)
    with _queue_errors():
        token = ingest.add_station(name)
        if update:
            worklist.configure_station(spec)
    typer.echo(token)


@station_app.command("set")
def station_set(
    name: str,
    institution: InstitutionOpt = None,
    jurisdiction: JurisdictionOpt = None,
    language: StationLanguageOpt = None,
    prefer: PreferOpt = None,
    exclude: ExcludeOpt = None,
    sla: SlaOpt = None,
    pacs: PacsOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Change a station's reading profile; only the options given change (an empty value,
    e.g. --prefer '', clears a list). Its token is kept."""
    from reading_queue.roster import StationSpec

    update = _station_update(institution, jurisdiction, language, prefer, exclude, sla, pacs)
    settings = _settings(HubSettings, config, data_dir=data_dir)
    _, worklist = _open_queue(settings)
    with _queue_errors():
        current = worklist.station(name)
    spec = _validated(StationSpec, {**current.model_dump(), **update}, f"station {name}")
    _check_radiologists(worklist, spec.preferred + spec.excluded)
    if spec == current:
        console.print(f"station {escape(name)}: unchanged")
        return
    with _queue_errors():
        worklist.configure_station(spec)
    changed = sorted(k for k in update if getattr(spec, k) != getattr(current, k))
    typer.echo(f"station {name}: updated {', '.join(changed)}")


@station_app.command("token")
def station_token(name: str, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Issue a new token for a station and print it (shown once); the old one stops working."""
    settings = _settings(HubSettings, config, data_dir=data_dir)
    ingest = _open_ingest(settings)
    with _queue_errors():
        token = ingest.rotate_token(name)
    console.print(
        f"station {escape(name)}: new token issued; the previous one no longer works",
        soft_wrap=True,
    )
    typer.echo(token)


@station_app.command("list")
def station_list(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List registered stations with their reading profile (institution, jurisdiction,
    report language, preferred/excluded radiologists, contract SLAs, PACS)."""
    settings = _settings(HubSettings, config, data_dir=data_dir)
    stations = _open_ingest(settings).list_stations()
    rows: list[dict[str, Any]] = [
        {
            "name": s.name,
            "active": s.active,
            "created_at": s.created_at,
            "institution": s.institution,
            "jurisdiction": s.jurisdiction,
            "language": s.language,
            "preferred": list(s.preferred or []),
            "excluded": list(s.excluded or []),
            "sla_minutes": dict(s.sla_minutes or {}),
            "pacs": list(s.pacs or []),
        }
        for s in stations
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    _print_table(
        "Stations",
        [
            "name",
            "state",
            "created",
            "institution",
            "jurisd.",
            "lang",
            "SLA (min)",
            "prefer",
            "exclude",
            "PACS",
        ],
        [
            [
                r["name"],
                "active" if r["active"] else "revoked",
                _when(r["created_at"]),
                r["institution"] or "-",
                r["jurisdiction"] or "-",
                r["language"] or "-",
                _sla_text(r["sla_minutes"]),
                _csv(r["preferred"]),
                _csv(r["excluded"]),
                _csv([f"{p['name']}={p['aet']}@{p['host']}:{p['port']}" for p in r["pacs"]]),
            ]
            for r in rows
        ],
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
