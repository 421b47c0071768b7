"""Issue 9 end to end, over real HTTP and real associations: a non-conformant UID never
reaches the forward queue, a study the hub refuses steps aside without blocking the others,
a station cannot touch another station's study, and the hub learns of undeliverable
instances."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicom_gateway.durable.scp import INVALID_UID
from dicom_gateway.durable.state import FAILED
from sample_studies.generate import make_ct_series
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until

LONG_UID = "1.2.840." + "1234567890." * 6 + "1"  # 75 characters


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", *args], capture_output=True, text=True, timeout=120
    )


def _push(port: int, aet: str, datasets: list[Dataset], calling: str = "CT01") -> list[int]:
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def _series(tmp_path: Path, name: str, n: int, seed: int) -> list[Dataset]:
    return [dcmread(p) for p in make_ct_series(tmp_path / name, n, seed=seed, matrix=64)]


@pytest.mark.parametrize(
    ("bad_uid", "problem"),
    [
        (LONG_UID, "75 characters long (at most 64)"),  # real modalities send these
        ("1.2/../../../escaped", "contains characters other than digits and dots"),
    ],
    ids=["long", "path-like"],
)
def test_non_conformant_uid_is_quarantined_and_the_rest_flows(
    tmp_path: Path, bad_uid: str, problem: str
) -> None:
    good = _series(tmp_path, "good", 2, 41)
    bad = _series(tmp_path, "bad", 2, 42)
    for ds in bad:
        ds.SeriesInstanceUID = bad_uid
    with InProcessHub(tmp_path / "hub") as hub:
        token = hub.add_station("tram-uid")
        with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
            assert _push(gw.port, gw.aet, bad) == [INVALID_UID, INVALID_UID]
            assert _push(gw.port, gw.aet, good) == [0, 0]
            study = str(good[0].StudyInstanceUID)
            wait_until(lambda: hub.committed().get(study) == 2, 60, "the good study committed")
            status = json.loads(
                _cli("gateway", "status", "--json", "--data-dir", str(gw.settings.data_dir)).stdout
            )
        assert [s["study_uid"] for s in status["studies"]] == [study]
        assert status["quarantined"] == 2
        reasons = {q["reason"] for q in status["quarantine"]}
        assert reasons == {f"SeriesInstanceUID is not a valid UID ({problem}): {bad_uid!r}"}
        assert str(bad[0].StudyInstanceUID) not in hub.committed()
        assert not list(tmp_path.glob("**/escaped*"))
        # The hub's upload API refuses the same UIDs with a clear 422 (an old gateway).
        token2 = hub.add_station("tram-old")
        manifest = {"instances": [{"sop_instance_uid": bad_uid, "size": 1, "sha256": "0" * 64}]}
        refused = httpx.post(
            f"{hub.url}/api/v1/ingest/studies/{good[0].StudyInstanceUID}/manifest",
            json=manifest,
            headers={"Authorization": f"Bearer {token2}"},
        )
        assert refused.status_code == 422 and "not a usable UID" in refused.text


def test_another_stations_study_is_refused_and_steps_aside_at_that_gateway(
    tmp_path: Path,
) -> None:
    """Station B sends a study that station A started: the hub refuses (403) B's manifest,
    commit and priority; B's gateway counts the refusals, holds the study aside as needs
    attention, and B's other studies keep flowing. `gateway retry` sends it again."""
    shared = _series(tmp_path, "shared", 2, 43)
    own = _series(tmp_path, "own", 2, 44)
    study = str(shared[0].StudyInstanceUID)
    with InProcessHub(tmp_path / "hub") as hub:
        token_a, token_b = hub.add_station("tram-a"), hub.add_station("tram-b")
        # A starts the study (a manifest is enough to claim it).
        manifest = {
            "priority": 2,
            "instances": [
                {"sop_instance_uid": str(shared[0].SOPInstanceUID), "size": 1, "sha256": "0" * 64}
            ],
        }
        url = f"{hub.url}/api/v1/ingest/studies/{study}"
        head_a = {"Authorization": f"Bearer {token_a}"}
        head_b = {"Authorization": f"Bearer {token_b}"}
        assert httpx.post(f"{url}/manifest", json=manifest, headers=head_a).status_code == 200
        stat = {**manifest, "priority": 0}
        refused = httpx.post(f"{url}/manifest", json=stat, headers=head_b)
        assert refused.status_code == 403 and "another station" in refused.text
        commit = {"priority": 0, "sop_instance_uids": [str(shared[0].SOPInstanceUID)]}
        assert httpx.post(f"{url}/commit", json=commit, headers=head_b).status_code == 403
        (row,) = hub.ingest.studies()
        assert row.station == "tram-a" and row.priority == 2  # B changed nothing
        # B's gateway: the shared study is refused again and again, its own study flows.
        with InProcessGateway(
            tmp_path / "gw-b", hub_url=hub.url, token=token_b, retry_max_s=0.5
        ) as gw:
            assert _push(gw.port, gw.aet, shared) == [0, 0]
            assert _push(gw.port, gw.aet, own) == [0, 0]
            own_uid = str(own[0].StudyInstanceUID)
            wait_until(lambda: hub.committed().get(own_uid) == 2, 60, "B's own study")
            held = wait_until(
                lambda: [a for a in gw.state.attention_list() if a["held_at"]],
                60,
                "the refused study held aside",
            )
            assert held[0]["study_uid"] == study and "another station" in held[0]["reason"]
            out = _cli("gateway", "status", "--data-dir", str(gw.settings.data_dir)).stdout
            assert "Needs attention" in out and "another station" in out
            retry = _cli("gateway", "retry", study, "--data-dir", str(gw.settings.data_dir))
            assert retry.returncode == 0 and "sent again" in retry.stdout
            assert not [a for a in gw.state.attention_list() if a["held_at"]]
        assert study not in hub.committed()


def test_conflicting_content_on_the_hub_dicom_port_is_failed_and_the_study_incomplete(
    tmp_path: Path,
) -> None:
    """Different content under a held SOP Instance UID, straight to the hub: not retried for
    ever; the study is committed and the worklist says it is incomplete."""
    from reading_queue.worklist.roster import StationSpec

    first = _series(tmp_path, "first", 2, 45)
    study = str(first[0].StudyInstanceUID)
    with InProcessHub(tmp_path / "hub") as hub:
        hub.add_station("bvbm")
        hub.hub.worklist.configure_station(StationSpec(name="bvbm", jurisdiction="VN"))
        hub.ingest.add_source("HOSP_PACS", "bvbm")
        port = hub.hub.inbox.listener.port
        # The study's first two instances reached the hub another way (the station's
        # gateway, say); the PACS then sends one of them again with other content.
        from reading_queue.intake.service import StudyMeta

        for ds in first:
            hub.ingest.store_instance("bvbm", _bytes(ds))
        uids = [str(ds.SOPInstanceUID) for ds in first]
        assert hub.ingest.commit("bvbm", study, uids, StudyMeta()).committed
        changed = dcmread(BytesIO(_bytes(first[1])))
        changed.PixelData = bytes(len(changed.PixelData))  # other pixels, same UIDs
        extra = _series(tmp_path, "extra", 1, 46)[0]
        extra.StudyInstanceUID = study
        extra.SeriesInstanceUID = first[0].SeriesInstanceUID
        # Accepted by the listener (it cannot know); refused by intake, not retried.
        assert _push(port, hub.settings.aet, [changed, extra], "HOSP_PACS") == [0, 0]
        wait_until(lambda: hub.committed().get(study) == 3, 60, "follow-up with the new one")
        inbox = hub.hub.inbox.state
        failed = wait_until(
            lambda: inbox.query("SELECT last_status FROM deliveries WHERE state = ?", (FAILED,)),
            60,
            "the conflicting instance failed",
        )
        assert "different content" in failed[0][0]
        wait_until(
            lambda: hub.hub.worklist.study(study).missing_instances == 1,
            60,
            "the worklist knows the study is incomplete",
        )
        time.sleep(1.5)  # a retry loop would show as more attempts; there must be none
        assert inbox.scalar("SELECT attempts FROM deliveries WHERE state = ?", (FAILED,)) == 0
        listing = _cli("hub", "worklist", "--data-dir", str(hub.settings.data_dir))
        assert "INCOMPLETE: 1 instances not delivered" in listing.stdout


def _bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_conflicting_upload_commits_the_study_incomplete_and_is_listed(tmp_path: Path) -> None:
    """A modality re-uses a SOP Instance UID another station's study holds, with other
    content: the hub keeps it aside (`telerad hub conflicts`), commits the new study without
    it and marks it incomplete; the sending gateway is not stuck re-sending it."""
    first = _series(tmp_path, "x", 1, 47)
    second = _series(tmp_path, "y", 2, 48)
    second[0].SOPInstanceUID = first[0].SOPInstanceUID  # the modality bug
    second[0].file_meta.MediaStorageSOPInstanceUID = first[0].SOPInstanceUID
    with InProcessHub(tmp_path / "hub") as hub:
        token_a, token_b = hub.add_station("tram-x"), hub.add_station("tram-y")
        with InProcessGateway(tmp_path / "gw-a", hub_url=hub.url, token=token_a) as gw:
            assert _push(gw.port, gw.aet, first) == [0]
            x_uid = str(first[0].StudyInstanceUID)
            wait_until(lambda: hub.committed().get(x_uid) == 1, 60, "study X committed")
        with InProcessGateway(tmp_path / "gw-b", hub_url=hub.url, token=token_b) as gw:
            assert _push(gw.port, gw.aet, second) == [0, 0]
            y_uid = str(second[0].StudyInstanceUID)
            wait_until(lambda: hub.committed().get(y_uid) == 1, 60, "study Y committed")
            assert not gw.state.attention_list()
        (y,) = [s for s in hub.ingest.studies() if s.study_uid == y_uid]
        assert y.missing_instances == 1 and "conflicting" in y.missing_reason
        listing = json.loads(
            _cli("hub", "conflicts", "--json", "--data-dir", str(hub.settings.data_dir)).stdout
        )
        assert [(c["study_uid"], c["station"]) for c in listing] == [(y_uid, "tram-y")]
        assert Path(listing[0]["path"]).exists()
        # Study X is untouched: still its own single instance.
        assert hub.committed().get(x_uid) == 1
