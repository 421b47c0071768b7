"""``telerad hub station``: stations allowed to upload, tokens, reading profiles."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from reading_queue.settings import HubSettings

if TYPE_CHECKING:
    pass

from telerad.cli.common import (
    ConfigOpt,
    DataDirOpt,
    ExcludeOpt,
    InstitutionOpt,
    JsonOpt,
    JurisdictionOpt,
    PacsOpt,
    PreferOpt,
    SlaOpt,
    StationLanguageOpt,
    _csv,
    _fail,
    _open_ingest,
    _open_queue,
    _print_table,
    _queue_errors,
    _settings,
    _sla_text,
    _split,
    _validated,
    _when,
    console,
)
from telerad.cli.radiologist import _check_radiologists

station_app = typer.Typer(
    help="Stations allowed to upload to this hub, and their reading profiles.",
    no_args_is_help=True,
)

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
    from reading_queue.worklist.roster import StationSpec

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
    from reading_queue.worklist.roster import StationSpec

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
