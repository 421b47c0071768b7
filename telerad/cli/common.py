"""Shared by every sub-app: settings loading, output (tables, JSON), errors, options."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reading_queue.settings import HubSettings

if TYPE_CHECKING:
    from reading_queue.intake.service import IngestService
    from reading_queue.worklist.service import Worklist


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
    """The role's settings from flags, ``TELERAD_*`` and the TOML file; a configuration
    that cannot be used (an unknown key, a bad value) is one red message and exit 2."""
    _use_config(config)
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        # Never str(exc): pydantic's text repeats the input, which may hold a token.
        _fail(f"configuration error: {_validation_text(exc)}", 2)
    except Exception as exc:
        _fail(f"configuration error: {exc}", 2)


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
    from reading_queue.intake.service import open_ingest

    return open_ingest(settings)


def _open_queue(settings: HubSettings) -> tuple[IngestService, Worklist]:
    """The hub's ingest service and worklist, as the running hub opens them, except that a
    configured ``roster_file`` is not seeded here: seeding is the hub's job at its first
    start (`telerad hub roster load` applies a file on purpose)."""
    from reading_queue.intake.service import open_ingest
    from reading_queue.worklist.worker import open_worklist

    ingest = open_ingest(settings)
    return ingest, open_worklist(
        settings.model_copy(update={"roster_file": None}), ingest.engine, ingest.first_header
    )


def _worklist(config: Path | None, data_dir: Path | None) -> Worklist:
    settings = _settings(HubSettings, config, data_dir=data_dir)
    return _open_queue(settings)[1]


def _csv(values: Iterable[str]) -> str:
    return ",".join(values) or "-"


def _sla_text(sla: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sla.items()) or "-"


def _minutes_left(deadline: float, now: float) -> float:
    return round((deadline - now) / 60.0, 1)


UidArg = Annotated[str, typer.Argument(help="Study Instance UID.")]
ActorOpt = Annotated[
    str | None,
    typer.Option("--actor", help="Who does it, for the history (default: $USER, else admin)."),
]
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
