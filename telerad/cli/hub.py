"""``telerad hub``: serve the hub, the worklist, rounds, claims, the simulator, studies, export."""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from reading_queue.settings import HubSettings
from telerad.core.priority import Priority

if TYPE_CHECKING:
    from reading_queue.models import Study
    from reading_queue.worklist.engine import Decision

from telerad.cli.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    _fail,
    _minutes_left,
    _open_queue,
    _print_table,
    _queue_errors,
    _settings,
    _setup_logging,
    _split,
    _wait_forever,
    _when,
    _worklist,
    console,
)

hub_app = typer.Typer(help="Hub: receives station uploads and DICOM, keeps the archive.")


@hub_app.command("serve")
def hub_serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port (upload protocol).")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM listener port.")] = None,
    aet: Annotated[str | None, typer.Option(help="Hub AE title.")] = None,
    archive: Annotated[str | None, typer.Option(help="filesystem or orthanc")] = None,
    api_docs: Annotated[
        bool | None,
        typer.Option(
            "--api-docs",
            help="Serve the OpenAPI schema and pages (/docs, /redoc, /openapi.json); off "
            "by default.",
            show_default=False,
        ),
    ] = None,
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
        api_docs=api_docs,
    )
    hub = Hub(settings)
    hub.start_dicom()
    hub.start_http(log_level="info" if verbose else "warning")
    deadline = time.monotonic() + 30
    while not hub.started and time.monotonic() < deadline:
        time.sleep(0.05)
    console.print(
        f"hub listening on http port {hub.http_port}"
        + (
            f", DICOM {settings.aet} port {hub.inbox.listener.port}"
            if settings.dicom_port >= 0
            else ""
        )
        + (
            f", metrics on http://{settings.metrics_host}:{hub.metrics_port}/metrics"
            if hub.metrics_port is not None
            else ""
        )
        + (", API docs on /docs" if settings.api_docs else "")
    )
    stop = threading.Event()
    _wait_forever(stop)
    hub.stop()


# -- hub: reading queue -------------------------------------------------------------------
#
# Privacy: listings show UIDs, accession numbers, stations and radiologist keys, never a
# patient's name, ID or birth date (the worklist keeps them for priors and stickiness only).


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
        "missing_instances": st.missing_instances,
        "needs_jurisdiction": not st.jurisdiction and not done,
        "merged_into": st.merged_into,
    }


def _notes(row: dict[str, Any]) -> str:
    notes = []
    if row["escalated"]:
        notes.append("escalated")
    if row["needs_jurisdiction"]:
        notes.append("needs jurisdiction (set the station's: telerad hub station set)")
    if row["missing_instances"]:
        notes.append(f"INCOMPLETE: {row['missing_instances']} instances not delivered")
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
    from reading_queue.simulator import PEAK_TZ, compare, dump_json, load_arrivals, synthetic_day
    from reading_queue.worklist.roster import Roster, load_roster

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


@hub_app.command("conflicts")
def hub_conflicts(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Instances that arrived with other content under a SOP Instance UID the hub already
    holds: kept aside in the quarantine, never merged, never dropped silently."""
    from reading_queue.intake.service import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    rows: list[dict[str, Any]] = [
        {
            "when": c.created_at,
            "station": c.station,
            "study_uid": c.study_uid,
            "sop_instance_uid": c.sop_instance_uid,
            "sha256": c.sha256,
            "path": c.path,
        }
        for c in open_ingest(settings).conflicts()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(
        "Conflicting content kept aside",
        ["when", "station", "study", "SOP Instance UID", "file"],
        [
            [_when(r["when"]), r["station"], r["study_uid"], r["sop_instance_uid"], r["path"]]
            for r in rows
        ],
    )


@hub_app.command("studies")
def hub_studies(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Studies the hub holds: committed ones are ready for the reading queue."""
    from reading_queue.intake.service import open_ingest

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
            "missing_instances": s.missing_instances,
            "missing_reason": s.missing_reason,
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
    from reading_queue.intake.service import open_ingest

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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    counts = {uid: len(ingest.study_instances(uid)) for uid in uids}
    total = 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=False,
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("exporting", total=sum(counts.values()))
        for uid in uids:
            base = total

            def advance(n: int, base: int = base) -> None:
                bar.update(task, completed=base + n)

            total += ingest.export(uid, out_dir, progress=advance)
    typer.echo(f"exported {total} instances of {len(uids)} studies to {out_dir}")


# -- samples ------------------------------------------------------------------------------
