"""The reading-queue CLI: radiologists, station profiles, roster files, the worklist, a
study's life from commit to final report, pull mode and the admin's manual controls.

Studies reach the worklist the way they do in the hub: real DICOM files (the committed
samples) stored and committed through the ingest service, whose outbox the worklist reads.
No network: every command runs in-process on typer's CliRunner, one smoke test runs the
installed ``telerad`` script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from typer.testing import CliRunner, Result

from reading_queue.intake.service import StudyMeta, open_ingest
from reading_queue.settings import HubSettings
from sample_studies.generate import committed_samples, restamp
from telerad.cli import app
from telerad.core.priority import Priority

ALWAYS = "daily 00:00-24:00"  # on shift whenever the test runs


class Hub:
    """A hub data directory driven through the CLI; remembers every output for the privacy
    check."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.runner = CliRunner()
        self.outputs: list[str] = []

    def run(self, *args: str, code: int = 0) -> Result:
        res = self.runner.invoke(app, [*args, "--data-dir", str(self.data_dir)])
        self.outputs.append(res.output)
        assert res.exit_code == code, f"{args} exited {res.exit_code}:\n{res.output}"
        assert "Traceback" not in res.output
        if code != 0:
            assert res.exception is None or isinstance(res.exception, SystemExit)
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def worklist(self, *args: str) -> dict[str, dict[str, Any]]:
        return {row["study_uid"]: row for row in self.json("hub", "worklist", *args)}

    def commit(self, station: str, files: list[Path], priority: Priority = Priority.ROUTINE) -> str:
        """Store and commit a study as the hub's receiving side does (outbox event)."""
        ingest = open_ingest(HubSettings(data_dir=self.data_dir))
        sops = [ingest.store_instance(station, f.read_bytes()) for f in files]
        ds = dcmread(files[0], stop_before_pixels=True)
        meta = StudyMeta(
            priority=int(priority), modality=str(ds.Modality), body_part=str(ds.BodyPartExamined)
        )
        result = ingest.commit(station, str(ds.StudyInstanceUID), sops, meta)
        assert result.committed and result.instance_count == len(files)
        return str(ds.StudyInstanceUID)


def _ct() -> list[Path]:
    return [p for p in committed_samples() if p.name.startswith("ct_")]


def _cr() -> list[Path]:
    return [p for p in committed_samples() if p.name.startswith("cr_")]


def _identities(files: list[Path]) -> set[str]:
    """Patient names (whole and each component) and IDs of the files."""
    out: set[str] = set()
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        out |= {str(ds.PatientID), str(ds.PatientName)}
        out |= {part for part in str(ds.PatientName).split("^") if len(part) > 2}
    return {i for i in out if i}


def _assert_no_patient_identity(hub: Hub, files: list[Path]) -> None:
    identities = _identities(files)
    assert len(identities) >= 4  # names and IDs of both sample patients
    text = "\n".join(hub.outputs)
    leaked = sorted(i for i in identities if i in text)
    assert not leaked, f"patient identity in CLI output: {leaked}"


def _add_readers(hub: Hub) -> None:
    hub.run(
        "hub", "radiologist", "add", "dr.lan", "--name", "Dr Lan", "--modality", "CT",
        "--modality", "CR", "--licence", "VN", "--language", "vi", "--shift", ALWAYS,
    )  # fmt: skip
    hub.run(
        "hub", "radiologist", "add", "dr.sok", "--modality", "CR", "--licence", "KH",
        "--language", "km", "--shift", ALWAYS,
    )  # fmt: skip


# -- radiologists ---------------------------------------------------------------------------


def test_radiologist_add_set_list_show_and_deactivate(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    added = hub.run(
        "hub", "radiologist", "add", "dr.lan", "--name", "Dr Lan", "--modality", "CT",
        "--modality", "cr", "--subspecialty", "neuro", "--licence", "VN", "--licence", "KH-12",
        "--language", "vi", "--timezone", "Asia/Ho_Chi_Minh", "--shift", "mon-fri 07:00-15:00",
        "--shift", "sat 00:00-24:00 on-call", "--max-concurrent", "4", "--rvu-per-hour", "8",
    )  # fmt: skip
    assert "dr.lan added" in added.stdout
    hub.run("hub", "radiologist", "add", "dr.night", "--modality", "CR", "--licence", "VN",
            "--shift", "daily 00:00-24:00 on-call")  # fmt: skip
    hub.run("hub", "radiologist", "add", "dr.off", "--modality", "CT,MR", "--licence", "VN")

    shown = hub.json("hub", "radiologist", "show", "dr.lan")
    assert shown["modalities"] == ["CR", "CT"] and shown["licences"] == ["KH-12", "VN"]
    assert shown["subspecialties"] == ["neuro"] and shown["languages"] == ["vi"]
    assert shown["shifts"] == ["mon-fri 07:00-15:00", "sat 00:00-24:00 on-call"]
    assert shown["max_concurrent"] == 4 and shown["rvu_per_hour"] == 8.0
    text = hub.run("hub", "radiologist", "show", "dr.lan").stdout
    assert "mon-fri 07:00-15:00" in text and "Asia/Ho_Chi_Minh" in text

    # Only the options given change; a list option replaces the list.
    changed = hub.run(
        "hub", "radiologist", "set", "dr.lan", "--max-concurrent", "2", "--language", "vi,en"
    )
    assert "updated languages, max_concurrent" in changed.stdout
    after = hub.json("hub", "radiologist", "show", "dr.lan")
    assert after["max_concurrent"] == 2 and after["languages"] == ["en", "vi"]
    assert after["modalities"] == shown["modalities"] and after["shifts"] == shown["shifts"]
    assert (
        "unchanged"
        in hub.run("hub", "radiologist", "set", "dr.lan", "--max-concurrent", "2").output
    )
    hub.run("hub", "radiologist", "set", "dr.lan", "--shift", ALWAYS)

    listed = {r["key"]: r for r in hub.json("hub", "radiologist", "list")}
    assert list(listed) == ["dr.lan", "dr.night", "dr.off"]
    assert listed["dr.lan"]["shift_state"] == "on_shift"
    assert listed["dr.lan"]["shift_ends_at"] > time.time()
    assert listed["dr.night"]["shift_state"] == "on_call"
    assert listed["dr.off"]["shift_state"] == "off" and listed["dr.off"]["shift_ends_at"] is None
    assert listed["dr.lan"]["open_studies"] == 0 and listed["dr.lan"]["max_concurrent"] == 2
    table = hub.run("hub", "radiologist", "list").stdout
    lan_line = next(line for line in table.splitlines() if line.startswith("dr.lan\t"))
    assert "on shift until" in lan_line and "0/2" in lan_line and "KH-12,VN" in lan_line

    hub.run("hub", "radiologist", "deactivate", "dr.off")
    assert hub.json("hub", "radiologist", "show", "dr.off")["active"] is False
    hub.run("hub", "radiologist", "activate", "dr.off")
    assert hub.json("hub", "radiologist", "show", "dr.off")["active"] is True
    missing = hub.run("hub", "radiologist", "deactivate", "dr.nobody", code=1)
    assert "no radiologist 'dr.nobody'" in missing.stderr
    assert hub.run("hub", "radiologist", "add", "dr.lan", "--modality", "CT", "--licence", "VN",
                   code=1).stderr.count("already exists") == 1  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timezone", "Mars/Olympus_Mons"], "--timezone: unknown time zone 'Mars/Olympus_Mons'"),
        (["--shift", "mon-fri 7-15"], "invalid --shift 'mon-fri 7-15': time '7' must be HH:MM"),
        (["--shift", "funday 07:00-15:00"], "unknown day 'funday'"),
        (["--shift", "mon-fri"], "write it as 'mon-fri 07:00-15:00 [on-call]'"),
        (["--max-concurrent", "-1"], "--max-concurrent: must be >= 0"),
    ],
)
def test_invalid_radiologist_is_one_clear_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    hub = Hub(tmp_path)
    res = hub.run(
        "hub", "radiologist", "add", "dr.x", "--modality", "CT", "--licence", "VN", *args, code=2
    )
    assert message in res.stderr
    assert res.stderr.strip().count("\n") == 0  # one line
    assert res.stdout == ""
    assert hub.json("hub", "radiologist", "list") == []  # nothing was stored


def test_radiologist_needs_a_modality_and_a_licence(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    res = hub.run("hub", "radiologist", "add", "dr.x", "--licence", "VN", code=2)
    assert "--modality: at least one is needed" in res.stderr
    res = hub.run("hub", "radiologist", "add", "dr x", "--modality", "CT", "--licence", "VN",
                  code=2)  # fmt: skip
    assert "KEY: letters, digits" in res.stderr
    hub.run("hub", "radiologist", "add", "dr.x", "--modality", "CT", "--licence", "VN")
    cleared = hub.run("hub", "radiologist", "set", "dr.x", "--modality", "", code=2)
    assert "--modality: at least one is needed" in cleared.stderr
    assert hub.json("hub", "radiologist", "show", "dr.x")["modalities"] == ["CT"]


# -- stations -----------------------------------------------------------------------------


def test_station_profile_set_token_and_list(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    _add_readers(hub)
    added = hub.run(
        "hub", "station", "add", "tram-hn", "--institution", "BV Bạch Mai", "--jurisdiction",
        "vn-hn", "--language", "VI", "--prefer", "dr.lan", "--exclude", "dr.sok", "--sla",
        "stat=20", "--sla", "urgent=120", "--pacs", "BVBM=BVBM_PACS@10.0.0.5:104",
    )  # fmt: skip
    token = added.stdout.strip()
    assert "\n" not in token and len(token) > 30  # only the token on stdout
    ingest = open_ingest(HubSettings(data_dir=tmp_path))
    assert ingest.authenticate(token) == "tram-hn"
    plain = hub.run("hub", "station", "add", "tram-kh").stdout.strip()
    assert ingest.authenticate(plain) == "tram-kh"

    (row, bare) = hub.json("hub", "station", "list")
    assert row["name"] == "tram-hn" and row["active"] is True and row["created_at"] > 0
    assert row["institution"] == "BV Bạch Mai"
    assert (row["jurisdiction"], row["language"]) == ("VN-HN", "vi")
    assert row["preferred"] == ["dr.lan"] and row["excluded"] == ["dr.sok"]
    assert row["sla_minutes"] == {"stat": 20.0, "urgent": 120.0}
    assert row["pacs"] == [{"name": "BVBM", "aet": "BVBM_PACS", "host": "10.0.0.5", "port": 104}]
    assert bare["name"] == "tram-kh" and bare["jurisdiction"] == "" and bare["sla_minutes"] == {}

    # Only the given fields change; '' clears a list.
    res = hub.run("hub", "station", "set", "tram-hn", "--language", "en", "--exclude", "")
    assert "updated excluded, language" in res.stdout
    row = hub.json("hub", "station", "list")[0]
    assert (row["language"], row["excluded"], row["jurisdiction"]) == ("en", [], "VN-HN")
    assert row["preferred"] == ["dr.lan"] and row["sla_minutes"] == {"stat": 20.0, "urgent": 120.0}
    assert ingest.authenticate(token) == "tram-hn"  # set keeps the token

    rotated = hub.run("hub", "station", "token", "tram-hn")
    new_token = rotated.stdout.strip()
    assert new_token != token and "previous one no longer works" in rotated.stderr
    assert ingest.authenticate(token) is None
    assert ingest.authenticate(new_token) == "tram-hn"

    table = hub.run("hub", "station", "list").stdout
    assert "stat=20,urgent=120" in table and "BVBM=BVBM_PACS@10.0.0.5:104" in table

    # Bad input: exit 2 and nothing created; unknown stations: exit 1.
    assert (
        "NAME=AET@HOST:PORT"
        in hub.run("hub", "station", "add", "tram-x", "--pacs", "BVBM@10.0.0.5", code=2).stderr
    )
    assert (
        "PRIORITY=MINUTES"
        in hub.run("hub", "station", "add", "tram-x", "--sla", "stat=soon", code=2).stderr
    )
    assert (
        "unknown priorities ['fast']"
        in hub.run("hub", "station", "add", "tram-x", "--sla", "fast=5", code=2).stderr
    )
    assert (
        "unknown radiologists dr.nobody"
        in hub.run("hub", "station", "add", "tram-x", "--prefer", "dr.nobody", code=2).stderr
    )
    assert [s["name"] for s in hub.json("hub", "station", "list")] == ["tram-hn", "tram-kh"]
    assert "no station 'tram-x'" in hub.run("hub", "station", "set", "tram-x", "--language",
                                            "vi", code=1).stderr  # fmt: skip
    assert "no station 'tram-x'" in hub.run("hub", "station", "token", "tram-x", code=1).stderr
    assert "already exists" in hub.run("hub", "station", "add", "tram-kh", code=1).stderr


# -- roster files -------------------------------------------------------------------------

ROSTER_YAML = """\
radiologists:
  - key: vn.hoang
    name: Dr Hoàng
    modalities: [CT, CR]
    subspecialties: [neuro]
    licences: [VN]
    languages: [vi, en]
    shifts:
      - {days: mon-fri, start: "07:00", end: "15:00"}
      - {days: sat-sun, start: "00:00", end: "24:00", on_call: true}
    max_concurrent: 3
    rvu_per_hour: 10
  - key: vn.le
    modalities: [CR]
    licences: [VN-HN]
stations:
  - {name: vn-hanoi-01, jurisdiction: VN-HN, language: vi, preferred: [vn.le]}
  - name: vn-hanoi-06
    institution: Hanoi trauma centre
    jurisdiction: VN-HN
    sla_minutes: {stat: 20, urgent: 120}
    pacs: [{name: HTC, aet: HTC_PACS, host: 10.1.0.9, port: 11112}]
"""

ROSTER_TOML = """\
[[radiologists]]
key = "kh.sok"
name = "Dr Sok"
modalities = ["CR", "DX", "CT"]
licences = ["KH"]
languages = ["km", "en"]
timezone = "Asia/Phnom_Penh"
shifts = [{days = "mon-fri", start = "07:00", end = "15:00"}]

[[stations]]
name = "kh-phnompenh-01"
jurisdiction = "KH-12"
language = "km"
excluded = []
sla_minutes = {routine = 2880}
"""


def test_roster_load_yaml_and_toml_then_export_round_trips(tmp_path: Path) -> None:
    hub = Hub(tmp_path / "hub")
    yaml_file = tmp_path / "roster.yaml"
    yaml_file.write_text(ROSTER_YAML, encoding="utf-8")
    toml_file = tmp_path / "roster.toml"
    toml_file.write_text(ROSTER_TOML, encoding="utf-8")

    out = hub.run("hub", "roster", "load", str(yaml_file)).stdout.splitlines()
    assert out[:2] == ["radiologist vn.hoang: created", "radiologist vn.le: created"]
    tokens = dict(line.removeprefix("station ").split(": created, token ") for line in out[2:])
    assert sorted(tokens) == ["vn-hanoi-01", "vn-hanoi-06"]
    ingest = open_ingest(HubSettings(data_dir=tmp_path / "hub"))
    assert {ingest.authenticate(t) for t in tokens.values()} == set(tokens)
    out = hub.run("hub", "roster", "load", str(toml_file)).stdout.splitlines()
    assert out[0] == "radiologist kh.sok: created"
    assert out[1].startswith("station kh-phnompenh-01: created, token ")

    # Loading again changes nothing and issues no token; an edit is an update.
    again = hub.run("hub", "roster", "load", str(yaml_file)).stdout
    assert "token" not in again and again.count(": unchanged") == 4
    yaml_file.write_text(ROSTER_YAML.replace("max_concurrent: 3", "max_concurrent: 5"), "utf-8")
    assert (
        "radiologist vn.hoang: updated" in hub.run("hub", "roster", "load", str(yaml_file)).stdout
    )

    hoang = hub.json("hub", "radiologist", "show", "vn.hoang")
    assert hoang["name"] == "Dr Hoàng" and hoang["max_concurrent"] == 5
    assert hoang["shifts"] == ["mon-fri 07:00-15:00", "sat-sun 00:00-24:00 on-call"]
    stations = {s["name"]: s for s in hub.json("hub", "station", "list")}
    assert stations["vn-hanoi-06"]["sla_minutes"] == {"stat": 20.0, "urgent": 120.0}
    assert stations["kh-phnompenh-01"]["sla_minutes"] == {"routine": 2880.0}
    assert stations["vn-hanoi-01"]["preferred"] == ["vn.le"]

    for suffix in (".yaml", ".toml"):
        first = tmp_path / f"export{suffix}"
        hub.run("hub", "roster", "export", str(first))
        data = (
            tomllib.loads(first.read_text("utf-8"))
            if suffix == ".toml"
            else yaml.safe_load(first.read_text("utf-8"))
        )
        assert [r["key"] for r in data["radiologists"]] == ["kh.sok", "vn.hoang", "vn.le"]
        assert [s["name"] for s in data["stations"]] == [
            "kh-phnompenh-01",
            "vn-hanoi-01",
            "vn-hanoi-06",
        ]
        assert data["radiologists"][1]["shifts"][0] == {
            "days": "mon-fri",
            "start": "07:00",
            "end": "15:00",
            "on_call": False,
        }
        fresh = Hub(tmp_path / f"fresh{suffix}")
        loaded = fresh.run("hub", "roster", "load", str(first)).stdout
        assert loaded.count(": created") == 6
        second = tmp_path / f"again{suffix}"
        fresh.run("hub", "roster", "export", str(second))
        assert second.read_bytes() == first.read_bytes()

    assert (
        "use a .yaml, .yml or .toml"
        in hub.run("hub", "roster", "export", str(tmp_path / "roster.txt"), code=2).stderr
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("radiologists:\n  - {key: dr.x, modalities: [CT]}\n", encoding="utf-8")
    res = hub.run("hub", "roster", "load", str(bad), code=1)
    assert "invalid roster" in res.stderr and "radiologists.0.licences" in res.stderr
    res = hub.run("hub", "roster", "load", str(tmp_path / "missing.toml"), code=1)
    assert "cannot read roster" in res.stderr
    # A stations-only file may name radiologists the hub already has, not unknown ones.
    only = tmp_path / "stations.yaml"
    only.write_text("stations:\n  - {name: vn-hanoi-02, preferred: [vn.le, dr.ghost]}\n", "utf-8")
    res = hub.run("hub", "roster", "load", str(only), code=1)
    assert "stations name unknown radiologists dr.ghost" in res.stderr
    only.write_text("stations:\n  - {name: vn-hanoi-02, preferred: [vn.le]}\n", "utf-8")
    assert (
        "station vn-hanoi-02: created, token" in hub.run("hub", "roster", "load", str(only)).stdout
    )


# -- a study's life -----------------------------------------------------------------------


def test_round_assigns_then_open_and_final_with_history(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    _add_readers(hub)
    hub.run("hub", "station", "add", "tram-hn", "--jurisdiction", "VN-HN", "--language", "vi")
    uid = hub.commit("tram-hn", _ct())

    # The worklist takes committed studies in before listing them.
    row = hub.worklist()[uid]
    assert (row["state"], row["assignee"], row["priority"]) == ("ready", None, "routine")
    assert (row["modality"], row["body_part"], row["station"]) == ("CT", "CHEST", "tram-hn")
    assert row["instances"] == 4 and row["accession"]
    assert row["deadline"] == pytest.approx(row["received_at"] + 1440 * 60)
    assert 1430 < row["minutes_left"] <= 1440

    decided = hub.run("hub", "round").stdout.splitlines()
    assert len(decided) == 1
    kind, study, who, reasons = decided[0].split("\t")
    assert (kind, study, who) == ("assign", uid, "dr.lan")
    assert "eligible: dr.lan licensed VN, reads CT, reports in vi, on shift" in reasons
    assert "chosen: least projected load" in reasons
    row = hub.worklist()[uid]
    assert (row["state"], row["assignee"]) == ("assigned", "dr.lan")
    assert row["lease_expires_at"] > time.time()
    assert hub.json("hub", "radiologist", "show", "dr.lan")["open_studies"] == 1
    table = hub.run("hub", "worklist").stdout
    assert uid in table and "dr.lan" in table and "CT/CHEST" in table

    # Someone else may not report it; its reader may.
    not_his = hub.run("hub", "study", "final", uid, "dr.sok", code=1)
    assert "expected in_progress/preliminary held by dr.sok" in not_his.stderr
    assert "in_progress (dr.lan)" in hub.run("hub", "study", "open", uid, "dr.lan").stdout
    assert "final (dr.lan)" in hub.run("hub", "study", "final", uid, "dr.lan").stdout
    assert uid not in hub.worklist()  # done: only with --all
    assert hub.worklist("--all")[uid]["state"] == "final"
    assert hub.worklist("--state", "final")[uid]["minutes_left"] is None

    history = hub.json("hub", "study", "history", uid)
    assert [e["to_state"] for e in history] == [
        "received",
        "ready",
        "assigned",
        "in_progress",
        "final",
    ]
    assert [e["kind"] for e in history] == ["received", "ready", "assigned", "started", "final"]
    assigned = history[2]
    assert assigned["actor"] == "engine" and assigned["radiologist"] == "dr.lan"
    assert any(r.startswith("eligible: dr.lan") for r in assigned["detail"]["reasons"])
    assert history[4]["actor"] == "radiologist:dr.lan"
    text = hub.run("hub", "study", "history", uid).stdout
    assert "in_progress -> final" in text and "chosen: least projected load" in text

    assert (
        "no study 1.2.3.4 on the worklist"
        in hub.run("hub", "study", "history", "1.2.3.4", code=1).stderr
    )
    _assert_no_patient_identity(hub, _ct())


def test_pull_claim_and_admin_priority_assign_cancel_merge(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    _add_readers(hub)
    hub.run("hub", "station", "add", "tram-hn", "--jurisdiction", "VN-HN", "--language", "vi",
            "--sla", "stat=20")  # fmt: skip
    first = hub.commit("tram-hn", _ct())
    second = hub.commit("tram-hn", restamp(_ct(), tmp_path / "late", salt="late-series"))
    chest = hub.commit("tram-hn", _cr())
    assert len({first, second, chest}) == 3

    # Pull: the most urgent study the radiologist may read, with the reasons.
    claimed = hub.run("hub", "claim", "dr.lan").stdout.splitlines()
    assert claimed[0] == first
    assert "  chosen: most urgent study they may read" in claimed[1:]
    assert any(line.startswith("  eligible: dr.lan licensed VN") for line in claimed[1:])
    assert hub.worklist("--radiologist", "dr.lan").keys() == {first}

    # Priority: the deadline is recomputed from receipt with the station's contract SLA.
    before = hub.worklist()[second]
    res = hub.run("hub", "study", "priority", second, "stat", "--actor", "chief")
    assert f"{second}: stat, deadline" in res.stdout
    row = hub.worklist()[second]
    assert row["priority"] == "stat"
    assert row["deadline"] == pytest.approx(before["received_at"] + 20 * 60)
    assert row["deadline"] < before["deadline"] and 0 < row["minutes_left"] <= 20
    changed = hub.json("hub", "study", "history", second)[-1]
    assert changed["kind"] == "priority_changed" and changed["actor"] == "admin:chief"
    assert (changed["detail"]["from"], changed["detail"]["to"]) == ("routine", "stat")
    assert (
        "unknown priority 'asap'"
        in hub.run("hub", "study", "priority", second, "asap", code=2).stderr
    )

    # Manual assignment: refused with the reason, then forced (and recorded as such).
    refused = hub.run("hub", "study", "assign", second, "dr.sok", code=1)
    assert f"dr.sok cannot read study {second}: does not read CT" in refused.stderr
    assert hub.worklist()[second]["assignee"] is None
    forced = hub.run("hub", "study", "assign", second, "dr.sok", "--force", "--actor", "chief")
    assert "forced although does not read CT" in forced.stdout
    assert hub.worklist()[second]["assignee"] == "dr.sok"
    manual = hub.json("hub", "study", "history", second)[-1]
    assert manual["kind"] == "assigned" and manual["actor"] == "admin:chief"
    assert manual["detail"]["reasons"] == ["manual by chief", "forced although does not read CT"]
    assert (
        "no radiologist 'dr.nobody'"
        in hub.run("hub", "study", "assign", second, "dr.nobody", code=1).stderr
    )

    # Cancel a duplicate: off the worklist, kept with --all; twice is refused.
    hub.run("hub", "study", "cancel", chest, "--reason", "duplicate of an earlier upload")
    assert chest not in hub.worklist()
    assert hub.worklist("--all")[chest]["state"] == "cancelled"
    assert hub.json("hub", "study", "history", chest)[-1]["detail"] == {
        "reason": "duplicate of an earlier upload"
    }
    assert (
        "is cancelled: cannot cancel"
        in hub.run("hub", "study", "cancel", chest, "--reason", "again", code=1).stderr
    )

    # Merge late series that came under a new UID into the study being read.
    merged = hub.run("hub", "study", "merge", second, first)
    assert f"{second}: merged into {first} (8 instances, assigned)" in merged.stdout
    rows = hub.worklist("--all")
    assert rows[second]["state"] == "cancelled" and rows[second]["merged_into"] == first
    assert rows[first]["instances"] == 8 and rows[first]["late_instances"] == 4
    assert rows[first]["priority"] == "stat"  # the more urgent of the two
    late = hub.json("hub", "study", "history", first)[-1]
    assert late["kind"] == "late_series" and late["detail"]["merged_from"] == second
    assert (
        "cannot merge a study into itself"
        in hub.run("hub", "study", "merge", first, first, code=1).stderr
    )

    # Nothing left for dr.lan: exit 0, nothing on stdout.
    nothing = hub.run("hub", "claim", "dr.lan")
    assert nothing.stdout == "" and "nothing to read" in nothing.stderr
    assert hub.json("hub", "claim", "dr.lan") is None

    # Released and nobody may take it: the round says why it waits.
    hub.run("hub", "study", "release", first, "dr.lan", "--reason", "outside my competence")
    assert hub.worklist()[first]["state"] == "ready"
    hub.run("hub", "radiologist", "deactivate", "dr.lan")
    waiting = hub.run("hub", "round", "--explain").stdout
    (line,) = [ln for ln in waiting.splitlines() if ln.startswith("wait\t")]
    assert line.startswith(f"wait\t{first}\t")
    assert "1 does not read CT" in line and "1 inactive" in line
    assert "nothing to read (dr.lan is deactivated)" in hub.run("hub", "claim", "dr.lan").stderr

    # Back on duty: assigned again, a preliminary, then the final report.
    hub.run("hub", "radiologist", "activate", "dr.lan")
    result = hub.json("hub", "round")
    assert result["assigned"] == 1
    assert [(d["kind"], d["study_uid"], d["radiologist"]) for d in result["decisions"]] == [
        ("assign", first, "dr.lan")
    ]
    hub.run("hub", "study", "open", first, "dr.lan")
    hub.run("hub", "study", "preliminary", first, "dr.lan")
    assert hub.worklist()[first]["state"] == "preliminary"  # still on the worklist
    hub.run("hub", "study", "final", first, "dr.lan")
    kinds = [e["kind"] for e in hub.json("hub", "study", "history", first)]
    assert kinds == [
        "received",
        "ready",
        "assigned",  # the claim
        "late_series",  # the merge
        "released",
        "assigned",  # the round
        "started",
        "preliminary",
        "final",
    ]

    # Every listing and history above stayed free of patient names and IDs.
    hub.run("hub", "worklist", "--all")
    for uid in (first, second, chest):
        hub.run("hub", "study", "history", uid)
    _assert_no_patient_identity(hub, _ct() + _cr())


def test_commands_keep_their_changes_with_a_roster_file_and_follow_pull_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = Hub(tmp_path / "hub")
    roster = tmp_path / "roster.yaml"
    roster.write_text(
        "radiologists:\n"
        "  - key: dr.lan\n    modalities: [CT]\n    licences: [VN]\n"
        '    shifts: [{days: daily, start: "00:00", end: "24:00"}]\n'
        "stations:\n  - {name: tram-hn, jurisdiction: VN-HN}\n",
        encoding="utf-8",
    )
    hub.run("hub", "roster", "load", str(roster))
    # The hub applies its roster_file when it starts; commands must not re-apply it, or
    # every command would undo the previous one.
    monkeypatch.setenv("TELERAD_ROSTER_FILE", str(roster))
    hub.run("hub", "radiologist", "deactivate", "dr.lan")
    assert hub.json("hub", "radiologist", "show", "dr.lan")["active"] is False
    hub.run("hub", "radiologist", "activate", "dr.lan")

    monkeypatch.setenv("TELERAD_ASSIGNMENT_MODE", "pull")
    uid = hub.commit("tram-hn", _ct())
    res = hub.run("hub", "round")
    assert res.stdout == "" and "0 assigned" in res.stderr and "pull mode" in res.stderr
    assert hub.worklist()[uid]["state"] == "ready"
    assert hub.run("hub", "claim", "dr.lan").stdout.splitlines()[0] == uid
    assert hub.worklist()[uid]["assignee"] == "dr.lan"


def test_installed_script_smoke(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("telerad")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "telerad.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, *args, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120
        )

    bad = run("hub", "radiologist", "add", "dr.x", "--modality", "CT", "--licence", "VN",
              "--timezone", "Asia/Atlantis")  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == (
        "invalid radiologist dr.x: --timezone: unknown time zone 'Asia/Atlantis' (use an IANA name)"
    )
    ok = run("hub", "radiologist", "add", "dr.x", "--modality", "CT", "--licence", "VN",
             "--shift", ALWAYS)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    listed = json.loads(run("hub", "radiologist", "list", "--json").stdout)
    assert [(r["key"], r["shift_state"]) for r in listed] == [("dr.x", "on_shift")]
    unknown = run("hub", "study", "open", "1.2.3", "dr.x")
    assert unknown.returncode == 1 and "no study 1.2.3 on the worklist" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    helped = subprocess.run([*cmd, "hub", "study", "--help"], capture_output=True, text=True)
    for command in ("history", "assign", "priority", "cancel", "merge", "open", "final"):
        assert command in helped.stdout
