"""``telerad hub radiologist``: who reads what, where they are licensed, shifts."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pydantic import ValidationError
from rich.markup import escape

if TYPE_CHECKING:
    from reading_queue.worklist.service import ReaderStatus, Worklist

from telerad.cli.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    KeyArg,
    LicenceOpt,
    MaxConcurrentOpt,
    ModalityOpt,
    RLanguageOpt,
    RNameOpt,
    RvuOpt,
    ShiftOpt,
    SubspecialtyOpt,
    TimezoneOpt,
    _csv,
    _fail,
    _print_table,
    _queue_errors,
    _split,
    _validated,
    _validation_text,
    _worklist,
    console,
)

radiologist_app = typer.Typer(
    help="Radiologists: what they read, where they are licensed, shifts, capacity.",
    no_args_is_help=True,
)


def _check_radiologists(worklist: Worklist, keys: Iterable[str]) -> None:
    wanted = set(keys)
    if not wanted:
        return
    known = {r.key for r in worklist.radiologists()}
    unknown = sorted(wanted - known)
    if unknown:
        _fail(f"unknown radiologists {', '.join(unknown)} (add them first)", 2)


# -- radiologists ---------------------------------------------------------------------------


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
    from reading_queue.worklist.roster import ShiftSpec

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
    from reading_queue.worklist.roster import RadiologistSpec

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
    from reading_queue.worklist.roster import RadiologistSpec

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
