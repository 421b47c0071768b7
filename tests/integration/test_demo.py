"""The quick start's first command runs the demo; it must work end to end, twice in a row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_demo_flows_samples_to_the_hub(tmp_path: Path) -> None:
    logs = ""
    for attempt in (1, 2):  # the second run re-sends identical files: idempotent, still green
        res = _run("demo", "--data-dir", str(tmp_path), "--ct-slices", "6", "--verbose")
        assert res.returncode == 0, f"run {attempt}:\n{res.stdout}\n{res.stderr[-4000:]}"
        assert "Committed at the hub" in res.stderr
        # and where a visitor signs in and opens each study in the viewer
        assert "/login" in res.stderr and res.stderr.count("/viewer?StudyInstanceUIDs=") == 2
        logs += res.stdout + res.stderr
    # Privacy: no patient name or ID in anything the services logged (debug level included).
    identities = set()
    for f in (tmp_path / "samples").rglob("*.dcm"):
        ds = dcmread(f, stop_before_pixels=True)
        identities |= {str(ds.PatientID), str(ds.PatientName)}
        identities |= {part for part in str(ds.PatientName).split("^") if len(part) > 2}
    assert identities and "DEBUG" in logs
    leaked = sorted(i for i in identities if i and i in logs)
    assert not leaked, f"patient identity in logs: {leaked}"
    studies = json.loads(
        _run("hub", "studies", "--json", "--data-dir", str(tmp_path / "hub")).stdout
    )
    assert sorted((s["modality"], s["instances"], s["state"]) for s in studies) == [
        ("CR", 1, "committed"),
        ("CT", 6, "committed"),
    ]
    # The reading queue took them over and assigned them to eligible radiologists.
    assert "Reading queue (push mode)" in logs
    worklist = json.loads(
        _run("hub", "worklist", "--json", "--data-dir", str(tmp_path / "hub")).stdout
    )
    assert sorted((w["modality"], w["state"]) for w in worklist) == [
        ("CR", "assigned"),
        ("CT", "assigned"),
    ]
    ct = next(w for w in worklist if w["modality"] == "CT")
    assert ct["assignee"] == "dr.lan"  # the only CT reader licensed for VN-HN
    status = json.loads(
        _run("gateway", "status", "--json", "--data-dir", str(tmp_path / "gateway")).stdout
    )
    assert {s["state"] for s in status["studies"]} == {"committed"}
    assert status["backlog_bytes"] == 0 and status["quarantined"] == 0
