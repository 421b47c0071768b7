"""Hub archive back-end ``orthanc``: station gateway -> hub -> a real Orthanc over REST.

What "identical" means here. The gateway's spool file is what the station received: the
modality's data set bytes behind a file meta written by the gateway (pynetdicom's
implementation UID). The hub's manifest check proves it received exactly those bytes, and
hands them to Orthanc with ``POST /instances``. The contract of the archive is that the data
set (everything after the file meta) and so the pixel data come back unchanged; Orthanc would
be free to rewrite the file meta group. These tests assert that contract, and on top of it
that Orthanc 1.10 keeps a REST upload verbatim (whole file, sha256 as recorded by the gateway),
which is what it does today and what makes ``hub export`` output verifiable against the
station's own hashes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select

from reading_queue.intake.archive import ArchiveError, OrthancArchive
from reading_queue.models import Upload
from sample_studies.generate import committed_samples, generate_samples, restamp
from tests.support import peers
from tests.support.peers import OrthancServer, storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until

CREDENTIALS = ("telerad", "orthanc-test-secret")
COMPRESSED = ["MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm", "GDCMJ2K_TextGBR.dcm"]


def _meta_end(data: bytes) -> int:
    """Offset of the data set: preamble, "DICM", the (0002,0000) element, the meta group."""
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")
    return 128 + 4 + 12 + group_length


def _hub_kwargs(orthanc: OrthancServer) -> dict[str, Any]:
    user, password = CREDENTIALS
    return {
        "archive": "orthanc",
        "orthanc_url": orthanc.url,
        "orthanc_user": user,
        "orthanc_password": password,
    }


def _push(paths: list[Path], gw: InProcessGateway) -> Counter[str]:
    """storescu into the gateway; returns the instance count per study pushed."""
    res = storescu(paths, "127.0.0.1", gw.port, gw.aet, "MODALITY")
    assert res.returncode == 0, res.stderr[-3000:]
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*.dcm"))]
    return Counter(str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files)


def _wait_committed(hub: InProcessHub, by_study: Counter[str], deadline_s: float = 90) -> None:
    wait_until(
        lambda: all(hub.committed().get(uid) == n for uid, n in by_study.items()),
        deadline_s,
        f"{sum(by_study.values())} instances of {len(by_study)} studies committed at the hub",
        poll_s=0.1,
    )


def _spool(gw: InProcessGateway, study_uid: str | None = None) -> dict[str, tuple[bytes, str]]:
    """SOP Instance UID -> (spool file bytes, sha256 the gateway recorded at receipt)."""
    sql = "SELECT sop_instance_uid, path, sha256 FROM instances WHERE ? IS NULL OR study_uid = ?"
    rows = gw.state.query(sql, (study_uid, study_uid))
    return {uid: (gw.gateway.spool.absolute(rel).read_bytes(), sha) for uid, rel, sha in rows}


def _assert_identical(sent: bytes, recorded_sha: str, exported: bytes, name: str) -> None:
    # The contract: data set bytes (so every attribute and the pixel data) unchanged.
    assert exported[_meta_end(exported) :] == sent[_meta_end(sent) :], f"{name}: data set changed"
    a, b = dcmread(BytesIO(sent)), dcmread(BytesIO(exported))
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID, name
    if "PixelData" in a:
        assert a.PixelData == b.PixelData, f"{name}: pixel data differ"
    # What Orthanc does today on top: the uploaded file is kept verbatim.
    assert hashlib.sha256(exported).hexdigest() == recorded_sha, f"{name}: file differs"
    assert exported == sent


def _orthanc_study(client: httpx.Client, study_uid: str) -> dict[str, Any]:
    found = client.post(
        "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    ).json()
    assert len(found) == 1, f"study {study_uid} not findable in Orthanc: {found}"
    study: dict[str, Any] = client.get(f"/studies/{found[0]}").json()
    return study


def _orthanc_instance_count(client: httpx.Client, orthanc_study_id: str) -> int:
    return len(client.get(f"/studies/{orthanc_study_id}/instances").json())


@pytest.fixture
def samples(tmp_path: Path) -> Iterator[Path]:
    """Generated samples (512x512 CT slices, a 2500x2048 CR) and three compressed files."""
    root = tmp_path / "push"
    generate_samples(root / "samples", ct_slices=6)
    (root / "pydicom").mkdir()
    for name in COMPRESSED:
        shutil.copy(str(get_testdata_file(name)), root / "pydicom" / name)
    yield root


def _cli_export(hub: InProcessHub, orthanc: OrthancServer, out: Path) -> str:
    user, password = CREDENTIALS
    env = dict(
        os.environ,
        TELERAD_ARCHIVE="orthanc",
        TELERAD_ORTHANC_URL=orthanc.url,
        TELERAD_ORTHANC_USER=user,
        TELERAD_ORTHANC_PASSWORD=password,
        COLUMNS="300",
    )
    env.pop("TELERAD_CONFIG", None)
    res = subprocess.run(
        [
            *(sys.executable, "-m", "telerad.cli", "hub", "export", "--all", str(out)),
            *("--data-dir", str(hub.settings.data_dir)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return re.sub(r"\s+", " ", res.stdout)


@pytest.mark.needs_orthanc
@pytest.mark.needs_dcmtk
def test_hub_archives_in_orthanc_and_exports_what_the_gateway_received(
    tmp_path: Path, samples: Path
) -> None:
    with OrthancServer(
        credentials=CREDENTIALS, workdir=tmp_path / "orthanc", graceful_stop=False
    ) as orthanc:
        # Authentication is on: without the credentials the archive is not usable.
        with pytest.raises(ArchiveError):
            OrthancArchive(orthanc.url).check()

        with InProcessHub(tmp_path / "hub", **_hub_kwargs(orthanc)) as hub:
            health = httpx.get(f"{hub.url}/healthz", timeout=30)
            assert health.status_code == 200 and health.json()["archive"] == "orthanc"
            token = hub.add_station("tram-1")
            with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
                by_study = _push([samples], gw)
                _wait_committed(hub, by_study)
                sent = _spool(gw)
                assert gw.state.scalar("SELECT count(*) FROM quarantine") == 0
            assert len(sent) == sum(by_study.values())

            # The instances are in Orthanc, each study findable by its Study Instance UID.
            with orthanc.client() as client:
                assert len(client.get("/instances").json()) == len(sent)
                for study_uid, n in by_study.items():
                    study = _orthanc_study(client, study_uid)
                    assert _orthanc_instance_count(client, study["ID"]) == n
                # The hub's reference for an instance is its Orthanc id.
                held = [i for uid in by_study for i in hub.ingest.study_instances(uid)]
                assert len(held) == len(sent)
                for inst in held:
                    tags = client.get(f"/instances/{inst.archive_ref}/simplified-tags").json()
                    assert tags["SOPInstanceUID"] == inst.sop_instance_uid
                    assert inst.sha256 == sent[inst.sop_instance_uid][1]

            # `telerad hub export --all` (the CLI, configured by environment) reads Orthanc.
            out = tmp_path / "export"
            message = _cli_export(hub, orthanc, out)
            assert f"exported {len(sent)} instances of {len(by_study)} studies" in message
            exported = {p.stem: p for p in out.rglob("*.dcm")}
            assert exported.keys() == sent.keys()
            for inst in held:
                path = out / inst.study_uid / inst.series_uid / f"{inst.sop_instance_uid}.dcm"
                data, sha = sent[inst.sop_instance_uid]
                _assert_identical(data, sha, path.read_bytes(), path.name)


@pytest.mark.needs_orthanc
@pytest.mark.needs_dcmtk
def test_orthanc_outage_makes_hub_unhealthy_and_uploads_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orthanc stops: /healthz says 503, a new study's upload is refused and retried by the
    gateway (nothing committed, nothing lost). Orthanc comes back on the same storage and
    ports: the new study is committed and the one from before the outage is still there."""
    before = tmp_path / "before"
    before.mkdir()
    for f in committed_samples():
        shutil.copy(f, before / f.name)
    during = tmp_path / "during"
    restamp(committed_samples(), during, salt="during-outage")

    workdir = tmp_path / "orthanc"
    orthanc = OrthancServer(credentials=CREDENTIALS, workdir=workdir).start()
    try:
        with InProcessHub(tmp_path / "hub", **_hub_kwargs(orthanc)) as hub:
            token = hub.add_station("tram-1")
            with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
                first = _push([before], gw)
                _wait_committed(hub, first)

                ports = [orthanc.http_port, orthanc.dicom_port]
                orthanc.stop()  # graceful; the storage directory is ours and stays
                health = httpx.get(f"{hub.url}/healthz", timeout=60)
                assert health.status_code == 503, health.text
                assert health.json()["status"] == "degraded", health.text

                second = _push([during], gw)  # a CT and a CR study

                def refused() -> dict[str, Any] | None:
                    rows = gw.state.query(
                        "SELECT state, detail FROM links WHERE destination = 'hub'"
                    )
                    link = dict(rows[0]) if rows else None
                    down = link and link["state"] == "down" and "503" in link["detail"]
                    return link if down else None

                link = wait_until(refused, 60, "the hub refuses the upload with 503")
                assert "archive unavailable" in link["detail"], link
                for study_uid, n in second.items():
                    assert study_uid not in hub.committed()
                    assert hub.ingest.study_instances(study_uid, committed_only=False) == []
                    states = gw.state.query(
                        "SELECT state FROM deliveries WHERE destination = 'hub' AND study_uid = ?",
                        (study_uid,),
                    )
                    assert len(states) == n
                    assert all(r[0] != "committed" for r in states)

                # Orthanc returns: same storage directory, same ports (the hub's URL).
                handed = iter(ports)
                monkeypatch.setattr(peers, "free_port", lambda: next(handed))
                orthanc = OrthancServer(credentials=CREDENTIALS, workdir=workdir).start()
                assert [orthanc.http_port, orthanc.dicom_port] == ports
                monkeypatch.undo()

                _wait_committed(hub, second)
                assert httpx.get(f"{hub.url}/healthz", timeout=30).status_code == 200
                wait_until(
                    lambda: (
                        gw.state.scalar("SELECT state FROM links WHERE destination='hub'") == "up"
                    ),
                    30,
                    "hub link up again",
                )
                sent_b = {uid: v for study in second for uid, v in _spool(gw, study).items()}
                assert gw.state.scalar("SELECT count(*) FROM quarantine") == 0

            with hub.ingest.session() as s:
                uploads = list(s.scalars(select(Upload)))
            assert uploads and all(u.state == "processed" for u in uploads), [
                (u.state, u.error) for u in uploads
            ]

            with orthanc.client() as client:
                assert len(client.get("/instances").json()) == sum((first + second).values())
                for study_uid, n in (first + second).items():
                    study = _orthanc_study(client, study_uid)
                    assert _orthanc_instance_count(client, study["ID"]) == n

            out = tmp_path / "export"
            assert sum(hub.ingest.export(uid, out) for uid in second) == len(sent_b)
            for uid, (data, sha) in sent_b.items():
                (path,) = out.rglob(f"{uid}.dcm")
                _assert_identical(data, sha, path.read_bytes(), path.name)
    finally:
        orthanc.stop()
