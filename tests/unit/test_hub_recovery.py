"""Hub start-up recovery runs at start only: CLI commands beside a running hub touch nothing."""

from __future__ import annotations

from pathlib import Path

from reading_queue.intake.service import open_ingest
from reading_queue.settings import HubSettings
from telerad.hub import Hub


def test_temporaries_are_removed_at_hub_start_not_by_cli_commands(tmp_path: Path) -> None:
    settings = HubSettings(data_dir=tmp_path, dicom_port=-1, disk_reserve_mb=1)
    open_ingest(settings)  # creates the layout
    in_flight = [tmp_path / "archive" / ".tmp" / "a.part", tmp_path / "tmp" / "b.part"]
    for path in in_flight:
        path.write_bytes(b"being written by the running hub")
    open_ingest(settings).studies()  # what `telerad hub studies` does beside a running hub
    assert all(p.exists() for p in in_flight)
    hub = Hub(settings)
    hub.start_dicom()  # a (re)starting hub: nothing can be writing these any more
    try:
        assert not any(p.exists() for p in in_flight)
    finally:
        hub.stop()
