"""``telerad hub audit``: who read which study, who signed in, from where (the audit trail)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from reading_queue.settings import HubSettings
from telerad.cli.common import ConfigOpt, DataDirOpt, JsonOpt, _fail, _print_table, _settings, _when

OUTCOMES = {0: "ok", 4: "minor failure", 8: "SERIOUS FAILURE", 12: "MAJOR FAILURE"}


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"--since {text!r} is not an ISO 8601 time (e.g. 2025-03-01T08:00)", 2)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def hub_audit(
    user: Annotated[str | None, typer.Option("--user", help="Only this username.")] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Only this Study Instance UID.")
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help="Only this event, e.g. auth.login, study.read.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="From this time on (ISO 8601; UTC if no zone).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most N events.")] = 100,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The audit trail, oldest first: every sign-in and every read of patient data.

    Example: telerad hub audit --user lan --since 2025-03-01
    """
    from reading_queue.audit import query_events
    from reading_queue.intake.service import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    rows = query_events(
        open_ingest(settings).engine,
        username=user,
        study_uid=study,
        event_type=event_type,
        since=_since(since),
        limit=limit,
    )
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    _print_table(
        "Audit trail",
        ["id", "at (UTC)", "user", "role", "event", "action", "outcome", "study", "from", "detail"],
        [
            [
                str(r.id),
                _when(r.at),
                r.username,
                r.role or "-",
                r.event_type,
                f"{r.action} ({r.action_code})",
                OUTCOMES.get(r.outcome, str(r.outcome)),
                r.study_uid or "-",
                r.address or "-",
                r.detail,
            ]
            for r in rows
        ],
    )
