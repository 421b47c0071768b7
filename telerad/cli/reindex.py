"""``telerad hub reindex``: build the DICOM attribute index (what QIDO-RS searches) from the
archive, for the instances a hub stored before the index existed (migration 0006)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from reading_queue.settings import HubSettings
from telerad.cli.common import ConfigOpt, DataDirOpt, JsonOpt, _fail, _settings, console


def hub_reindex(
    batch: Annotated[
        int, typer.Option("--batch", min=1, max=5000, help="Instances per transaction.")
    ] = 200,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Index every instance the index lacks, reading its header from the archive.

    Idempotent (an indexed instance is never read again) and safe beside a running hub;
    instances whose file cannot be read are listed and tried again on the next run.

    Example: telerad hub reindex --data-dir /var/lib/telerad-hub
    """
    from reading_queue.intake import index
    from reading_queue.intake.service import open_ingest

    settings = _settings(HubSettings, config, data_dir=data_dir)
    ingest = open_ingest(settings)
    total = index.count_unindexed(ingest.engine)
    if total == 0:
        result = index.ReindexResult()
    else:
        with Progress(
            TextColumn("indexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("reindex", total=total)
            result = index.reindex(
                ingest.engine,
                ingest.archive,
                batch=batch,
                progress=lambda done: bar.update(task, completed=done),
            )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "indexed": result.indexed,
                    "studies": result.studies,
                    "failed": [{"sop_instance_uid": u, "reason": r} for u, r in result.failed],
                },
                indent=2,
            )
        )
    elif total == 0:
        typer.echo("nothing to index: every instance the hub holds is indexed")
    else:
        typer.echo(f"{result.indexed} instances indexed in {result.studies} studies")
    if result.failed:
        for uid, why in result.failed[:20]:
            console.print(f"[yellow]not indexed: {uid}: {why}[/]", highlight=False)
        _fail(f"{len(result.failed)} instances could not be read; run again once fixed", 1)
