"""telerad: teleradiology store-and-forward (station gateway and hub).

Every option is also a TELERAD_<NAME> environment variable and a key of the TOML file given
with --config (tables "gateway" and "hub"); the command line wins over the environment, which
wins over the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from telerad import __version__
from telerad.cli.audit import hub_audit
from telerad.cli.common import _setup_logging, console
from telerad.cli.gateway import gateway_app
from telerad.cli.hub import hub_app
from telerad.cli.radiologist import radiologist_app
from telerad.cli.reindex import hub_reindex
from telerad.cli.roster import roster_app
from telerad.cli.samples import samples_app
from telerad.cli.source import source_app
from telerad.cli.station import station_app
from telerad.cli.study import study_app
from telerad.cli.user import user_app

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
app.add_typer(gateway_app, name="gateway")
app.add_typer(hub_app, name="hub")
hub_app.add_typer(station_app, name="station")
hub_app.add_typer(source_app, name="source")
hub_app.add_typer(user_app, name="user")
hub_app.add_typer(radiologist_app, name="radiologist")
hub_app.add_typer(roster_app, name="roster")
hub_app.add_typer(study_app, name="study")
hub_app.command("audit")(hub_audit)
hub_app.command("reindex")(hub_reindex)
app.add_typer(samples_app, name="samples")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


# -- gateway ------------------------------------------------------------------------------


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
