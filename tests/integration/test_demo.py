"""The quick start's first command runs the demo; it must work end to end, twice in a row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_demo_flows_samples_to_the_hub(tmp_path: Path) -> None:
    for attempt in (1, 2):  # the second run re-sends identical files: idempotent, still green
        res = _run("demo", "--data-dir", str(tmp_path), "--ct-slices", "6")
        assert res.returncode == 0, f"run {attempt}:\n{res.stdout}\n{res.stderr[-4000:]}"
        assert "Committed at the hub" in res.stderr
    studies = json.loads(
        _run("hub", "studies", "--json", "--data-dir", str(tmp_path / "hub")).stdout
    )
    assert sorted((s["modality"], s["instances"], s["state"]) for s in studies) == [
        ("CR", 1, "committed"),
        ("CT", 6, "committed"),
    ]
    status = json.loads(
        _run("gateway", "status", "--json", "--data-dir", str(tmp_path / "gateway")).stdout
    )
    assert {s["state"] for s in status["studies"]} == {"committed"}
    assert status["backlog_bytes"] == 0 and status["quarantined"] == 0
