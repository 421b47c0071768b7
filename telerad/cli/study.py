"""``telerad hub study``: one study on the worklist: history, admin changes, reading steps."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from telerad.core.priority import Priority

if TYPE_CHECKING:
    pass

from telerad.cli.common import (
    ActorOpt,
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    KeyArg,
    UidArg,
    _actor,
    _fail,
    _minutes_left,
    _print_table,
    _queue_errors,
    _when,
    _worklist,
)

study_app = typer.Typer(
    help="One study on the worklist: history, admin changes, the radiologist's steps.",
    no_args_is_help=True,
)


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
