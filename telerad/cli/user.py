"""``telerad hub user``: people who sign in (radiologists, clinic users, admins)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from reading_queue.settings import HubSettings
from telerad.cli.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    _fail,
    _open_queue,
    _print_table,
    _queue_errors,
    _settings,
    _when,
)

user_app = typer.Typer(
    help="People who sign in to the hub: radiologists, clinic users, admins.",
    no_args_is_help=True,
)

PasswordStdinOpt = Annotated[
    bool,
    typer.Option(
        "--password-stdin",
        help="Read the password from standard input (else one is generated and printed).",
    ),
]


def _password(from_stdin: bool) -> tuple[str, bool]:
    """The password and whether it was generated (then it is printed, once)."""
    from reading_queue.accounts import new_password

    if not from_stdin:
        return new_password(), True
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        _fail("no password on standard input", 2)
    return line, False


@user_app.command("add")
def user_add(
    username: str,
    role: Annotated[str, typer.Option("--role", help="radiologist, clinic or admin.")],
    radiologist: Annotated[
        str | None, typer.Option("--radiologist", help="The roster key of this radiologist.")
    ] = None,
    station: Annotated[
        str | None, typer.Option("--station", help="The one station a clinic user sees.")
    ] = None,
    password_stdin: PasswordStdinOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Add a user; prints a generated password unless --password-stdin.

    Example: telerad hub user add lan --role radiologist --radiologist dr.lan
    """
    from reading_queue.accounts import Accounts

    settings = _settings(HubSettings, config, data_dir=data_dir)
    ingest, worklist = _open_queue(settings)
    with _queue_errors():
        if radiologist is not None:
            worklist.radiologist(radiologist)  # must be on the roster
        if station is not None and station not in {s.name for s in ingest.list_stations()}:
            _fail(f"no station {station!r} (telerad hub station add {station})")
        password, generated = _password(password_stdin)
        Accounts(ingest.engine).add_user(
            username, role, password, radiologist=radiologist, station=station
        )
    typer.echo(password if generated else f"user {username} added")


@user_app.command("list")
def user_list(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Users, their role and what they are bound to (never a password or hash)."""
    from reading_queue.accounts import Accounts
    from reading_queue.intake.service import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    rows: list[dict[str, Any]] = [
        {
            "username": u.username,
            "role": u.role,
            "radiologist": u.radiologist,
            "station": u.station,
            "active": u.active,
            "created_at": u.created_at,
        }
        for u in Accounts(open_ingest(settings).engine).users()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(
        "Users",
        ["user", "role", "bound to", "active", "since"],
        [
            [
                r["username"],
                r["role"],
                r["radiologist"] or r["station"] or "-",
                "yes" if r["active"] else "DISABLED",
                _when(r["created_at"]),
            ]
            for r in rows
        ],
    )


def _set_active(username: str, active: bool, config: Any, data_dir: Any) -> None:
    from reading_queue.accounts import Accounts
    from reading_queue.intake.service import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    with _queue_errors():
        Accounts(open_ingest(settings).engine).set_active(username, active)


@user_app.command("disable")
def user_disable(username: str, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Disable a user: refused at once, live tokens included."""
    _set_active(username, False, config, data_dir)
    typer.echo(f"user {username} disabled")


@user_app.command("enable")
def user_enable(username: str, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Enable a disabled user again (they sign in anew)."""
    _set_active(username, True, config, data_dir)
    typer.echo(f"user {username} enabled")


@user_app.command("password")
def user_password(
    username: str,
    password_stdin: PasswordStdinOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Set a new password (generated and printed unless --password-stdin); every session of
    the user ends."""
    from reading_queue.accounts import Accounts
    from reading_queue.intake.service import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    password, generated = _password(password_stdin)
    with _queue_errors():
        Accounts(open_ingest(settings).engine).set_password(username, password)
    typer.echo(password if generated else f"password of {username} changed")
