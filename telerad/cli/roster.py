"""``telerad hub roster``: radiologists and stations from and to one file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from reading_queue.worklist.roster import Roster

from telerad.cli.common import ConfigOpt, DataDirOpt, _fail, _queue_errors, _worklist, console

roster_app = typer.Typer(
    help="Roster files (YAML or TOML): radiologists and stations in one file.",
    no_args_is_help=True,
)


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
    from reading_queue.worklist.roster import load_roster

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
    from reading_queue.worklist.roster import Roster
    from telerad.core.fileio import write_atomic

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
