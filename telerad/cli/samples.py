"""``telerad samples``: synthetic sample studies."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress

if TYPE_CHECKING:
    pass

from telerad.cli.common import console

samples_app = typer.Typer(help="Synthetic sample studies.")


@samples_app.command("generate")
def samples_generate(
    out: Path,
    ct_slices: Annotated[int, typer.Option(help="Slices in the CT study.")] = 120,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 20261122,
) -> None:
    """Write the synthetic sample studies (CT + chest CR, Vietnamese and Khmer names)."""
    from sample_studies.generate import generate_samples

    with Progress(console=console) as progress:
        task = progress.add_task("generating samples", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        paths = generate_samples(out, ct_slices=ct_slices, seed=seed, progress=tick)
    typer.echo(f"wrote {len(paths)} files to {out}")
