"""Study life cycle across gateway and hub, the hub's own DICOM listener, health, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from sample_studies.generate import make_ct_series, restamp
from tests.support.peers import storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.needs_dcmtk
def test_forwarding_starts_before_the_study_is_complete_and_late_instances_merge(
    tmp_path: Path,
) -> None:
    files = make_ct_series(tmp_path / "ct", 6, seed=31, matrix=128)
    first, late = files[:4], files[4:]
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with InProcessHub(tmp_path / "hub") as hub:
        token = hub.add_station("tram-late")
        with InProcessGateway(
            tmp_path / "gw",
            hub_url=hub.url,
            token=token,
            quiet_period_s=3600,
            release_settle_s=3600,  # storescu releases its association: hold completeness
        ) as gw:
            assert storescu(first, "127.0.0.1", gw.port, gw.aet, "CT01").returncode == 0
            # The study is far from complete (1 h), yet the hub already holds every instance:
            # the link never idles through the quiet period. Nothing is committed yet.
            wait_until(
                lambda: len(hub.ingest.study_instances(study_uid, committed_only=False)) == 4,
                60,
                "instances held at the hub before the study is complete",
            )
            assert hub.committed() == {}
            status = json.loads(
                _cli("gateway", "status", "--json", "--data-dir", str(gw.settings.data_dir)).stdout
            )
            assert status["studies"][0]["state"] == "receiving"
        # Quiet period over (restart with a short one): the study is committed.
        with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
            wait_until(lambda: hub.committed().get(study_uid) == 4, 60, "first commit")
            # Late instances after the commit: a follow-up round, merged by the hub.
            assert storescu(late, "127.0.0.1", gw.port, gw.aet, "CT01").returncode == 0
            wait_until(lambda: hub.committed().get(study_uid) == 6, 60, "follow-up merged")
        (study,) = [s for s in hub.ingest.studies() if s.study_uid == study_uid]
        assert study.commit_count == 2 and study.instance_count == 6
        events = _events(hub)
        assert [e["new_instances"] for e in events] == [4, 2]


def _on_worklist(hub: InProcessHub) -> bool:
    from sqlalchemy import func, select

    from reading_queue.models import Study

    with hub.ingest.session() as s:
        return bool(s.scalar(select(func.count()).select_from(Study)))


def _events(hub: InProcessHub) -> list[dict[str, int]]:
    from sqlalchemy import select

    from reading_queue.models import StudyEvent

    with hub.ingest.session() as s:
        return [
            json.loads(e.payload) for e in s.scalars(select(StudyEvent).order_by(StudyEvent.id))
        ]


@pytest.mark.needs_dcmtk
def test_pacs_sends_straight_to_the_hub(tmp_path: Path) -> None:
    """Closed by default: an unregistered caller is rejected at association; a registered
    source's studies belong to its station, with that station's jurisdiction."""
    from reading_queue.worklist.roster import StationSpec

    files = make_ct_series(tmp_path / "ct", 3, seed=32, matrix=128)
    with InProcessHub(tmp_path / "hub") as hub:
        port = hub.hub.inbox.listener.port
        refused = storescu([tmp_path / "ct"], "127.0.0.1", port, hub.settings.aet, "HOSP_PACS")
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr + refused.stdout
        assert hub.ingest.studies() == []
        hub.add_station("bvbm")
        hub.hub.worklist.configure_station(
            StationSpec(name="bvbm", jurisdiction="VN-HN", language="vi")
        )
        hub.ingest.add_source("HOSP_PACS", "bvbm", "127.0.0.1")
        res = storescu([tmp_path / "ct"], "127.0.0.1", port, hub.settings.aet, "HOSP_PACS")
        assert res.returncode == 0, res.stderr
        committed = wait_until(hub.committed, 60, "study from the hospital PACS committed")
        assert list(committed.values()) == [len(files)]
        (study,) = hub.ingest.studies()
        assert study.station == "bvbm"
        listed = wait_until(
            lambda: hub.hub.worklist.study(study.study_uid) if _on_worklist(hub) else None,
            60,
            "the PACS study on the worklist",
        )
        assert listed.jurisdiction == "VN-HN" and listed.station == "bvbm"


def test_health_and_metrics(tmp_path: Path) -> None:
    with InProcessHub(tmp_path / "hub") as hub:
        token = hub.add_station("tram-health")
        assert httpx.get(f"{hub.url}/healthz").json()["status"] == "ok"
        assert "telerad_scp_instances_total" in httpx.get(f"{hub.url}/metrics").text
        # Station authentication on the upload protocol.
        assert (
            httpx.post(
                f"{hub.url}/api/v1/ingest/studies/1.2.3/manifest", json={"instances": []}
            ).status_code
            == 401
        )
        bad = httpx.post(
            f"{hub.url}/api/v1/ingest/studies/1.2.3/manifest",
            json={"instances": []},
            headers={"Authorization": "Bearer nope"},
        )
        assert bad.status_code == 401 and "unknown" in bad.json()["detail"]
        bad_body = httpx.post(
            f"{hub.url}/api/v1/ingest/studies/1.2.3/manifest",
            json={"instances": [{"sop_instance_uid": "1.2", "size": -1}]},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert bad_body.status_code == 422
        no_tus = httpx.post(
            f"{hub.url}/api/v1/ingest/uploads", headers={"Authorization": f"Bearer {token}"}
        )
        assert no_tus.status_code == 412
        with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
            health = httpx.get(f"http://127.0.0.1:{gw.gateway.http_port}/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            metrics = httpx.get(f"http://127.0.0.1:{gw.gateway.http_port}/metrics").text
            assert "telerad_forward_backlog_instances" in metrics


@pytest.mark.needs_dcmtk
def test_hub_cli_studies_export_and_stations(tmp_path: Path) -> None:
    sent = restamp(
        make_ct_series(tmp_path / "src", 3, seed=33, matrix=128), tmp_path / "ct", salt="cli"
    )
    hub_dir = tmp_path / "hub"
    added = _cli("hub", "station", "add", "tram-cli", "--data-dir", str(hub_dir))
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert len(token) > 30
    dup = _cli("hub", "station", "add", "tram-cli", "--data-dir", str(hub_dir))
    assert dup.returncode == 1 and "already exists" in dup.stderr
    listed = json.loads(_cli("hub", "station", "list", "--json", "--data-dir", str(hub_dir)).stdout)
    assert [s["name"] for s in listed] == ["tram-cli"]
    with (
        InProcessHub(hub_dir) as hub,
        InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw,
    ):
        assert storescu(sent, "127.0.0.1", gw.port, gw.aet, "CT01").returncode == 0
        wait_until(hub.committed, 60, "study committed")
    studies = json.loads(_cli("hub", "studies", "--json", "--data-dir", str(hub_dir)).stdout)
    assert len(studies) == 1 and studies[0]["state"] == "committed"
    assert studies[0]["instances"] == 3 and studies[0]["station"] == "tram-cli"
    uid = studies[0]["study_uid"]
    out = tmp_path / "out"
    res = _cli("hub", "export", uid, str(out), "--data-dir", str(hub_dir))
    assert res.returncode == 0, res.stderr
    exported = sorted(out.rglob("*.dcm"))
    assert len(exported) == 3
    originals = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in sent}
    for path in exported:
        ds = dcmread(path)
        assert ds.PixelData == originals[str(ds.SOPInstanceUID)].PixelData
    res = _cli("hub", "export", "--all", str(tmp_path / "all"), "--data-dir", str(hub_dir))
    assert res.returncode == 0 and len(list((tmp_path / "all").rglob("*.dcm"))) == 3
    missing = _cli("hub", "export", "1.2.3.4", str(tmp_path / "x"), "--data-dir", str(hub_dir))
    assert missing.returncode == 1 and "no committed study" in missing.stderr
    table = _cli("hub", "studies", "--data-dir", str(hub_dir))
    assert uid[:20] in table.stdout


def test_cli_help_documents_every_command() -> None:
    res = _cli("--help")
    assert res.returncode == 0
    for command in ("gateway", "hub", "samples", "demo"):
        assert command in res.stdout
    for group, commands in {
        "gateway": ("serve", "status", "priority", "send"),
        "hub": ("serve", "station", "studies", "export"),
    }.items():
        out = _cli(group, "--help").stdout
        for command in commands:
            assert command in out, f"telerad {group} --help lacks {command}"


def test_abandoned_uploads_expire_and_can_be_created_again(tmp_path: Path) -> None:
    import base64
    import time

    with InProcessHub(tmp_path / "hub") as hub:
        token = hub.add_station("tram-expiry")
        auth = {"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
        meta = ",".join(
            f"{k} {base64.b64encode(v.encode()).decode()}"
            for k, v in {"study_uid": "1.2.3", "bundle_sha256": "ab" * 32}.items()
        )
        create = {**auth, "Upload-Length": "100", "Upload-Metadata": meta}
        first = httpx.post(f"{hub.url}/api/v1/ingest/uploads", headers=create)
        assert first.status_code == 201
        location = hub.url + first.headers["Location"]
        patch = httpx.patch(
            location,
            content=b"x" * 10,
            headers={
                **auth,
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
            },
        )
        assert patch.status_code == 204 and patch.headers["Upload-Offset"] == "10"
        assert hub.ingest.expire_uploads(3600) == 0  # still fresh
        assert hub.ingest.expire_uploads(3600, now=time.time() + 7200) == 1
        assert httpx.head(location, headers=auth).status_code == 410
        assert not list((tmp_path / "hub" / "uploads").glob("*.bundle"))
        again = httpx.post(f"{hub.url}/api/v1/ingest/uploads", headers=create)
        assert again.status_code == 201 and again.headers["Upload-Offset"] == "0"
        assert again.headers["Location"] != first.headers["Location"]
