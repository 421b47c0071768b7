"""``telerad hub source``: who may send DICOM straight to the hub, and for which station."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from reading_queue.settings import HubSettings
from telerad.cli.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    _open_ingest,
    _print_table,
    _queue_errors,
    _settings,
    _when,
)

source_app = typer.Typer(
    help="DICOM sources (hospital PACS, modalities) admitted on the hub's own DICOM port.",
    no_args_is_help=True,
)

HostOpt = Annotated[
    str, typer.Option("--host", help="Only from this address (default: any address).")
]


@source_app.command("add")
def source_add(
    aet: str,
    station: Annotated[str, typer.Option("--station", help="The station its studies belong to.")],
    host: HostOpt = "",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Admit a calling AE title on the hub's DICOM port; its studies belong to STATION (its
    jurisdiction, language and SLA apply). Unregistered callers are rejected at association.

    Example: telerad hub source add BVBM_PACS --station bvbm --host 10.0.0.5
    """
    settings = _settings(HubSettings, config, data_dir=data_dir)
    with _queue_errors():
        _open_ingest(settings).add_source(aet, station, host)
    typer.echo(f"{aet}{'@' + host if host else ''} -> station {station}")


@source_app.command("remove")
def source_remove(
    aet: str, host: HostOpt = "", config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Stop admitting a DICOM source (instances already received are kept)."""
    settings = _settings(HubSettings, config, data_dir=data_dir)
    with _queue_errors():
        _open_ingest(settings).remove_source(aet, host)
    typer.echo(f"{aet}{'@' + host if host else ''} removed")


@source_app.command("list")
def source_list(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """The registered DICOM sources."""
    settings = _settings(HubSettings, config, data_dir=data_dir)
    rows: list[dict[str, Any]] = [
        {"aet": s.aet, "host": s.host, "station": s.station, "created_at": s.created_at}
        for s in _open_ingest(settings).list_sources()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(
        "DICOM sources",
        ["AE title", "host", "station", "since"],
        [[r["aet"], r["host"] or "any", r["station"], _when(r["created_at"])] for r in rows],
    )
