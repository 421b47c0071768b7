"""The hub's disk fills up (a real ENOSPC on a small tmpfs): uploads wait with 507 and a
clear message, the gateway backs off, nothing is committed half-written, /healthz degrades
before the disk is full, and the study commits once there is room again."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from sample_studies.generate import make_ct_series
from tests.support.peers import require_peer, storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: small enough to fill, resizable with ``remount``."""
    mount = tmp_path / "small"
    mount.mkdir()
    can = os.geteuid() == 0 and shutil.which("mount") is not None
    require_peer("tmpfs mounts", can, "needs root to mount a small tmpfs")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    require_peer("tmpfs mounts", res.returncode == 0, f"mount refused: {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.needs_dcmtk
def test_uploads_wait_for_disk_and_resume(tmp_path: Path, small_disk: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 24, seed=51, matrix=512)  # ~12 MiB raw
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    hub_dir = small_disk / "hub"
    # 24 MiB disk, 8 MiB reserve: /healthz is degraded below 16 MiB free, and an upload
    # needs three times its wire size above the reserve.
    with InProcessHub(hub_dir, disk_reserve_mb=8, database_url=_db(tmp_path)) as hub:
        token = hub.add_station("tram-disk")
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (10 * 2**20))  # leaves ~13 MiB free
        health = httpx.get(f"{hub.url}/healthz")
        assert health.status_code == 503 and health.json()["disk"]["state"] == "low"
        with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token, retry_max_s=1.0) as gw:
            assert storescu(files, "127.0.0.1", gw.port, gw.aet, "CT01").returncode == 0
            link = wait_until(
                lambda: next((lk for lk in _links(gw) if "507" in lk["detail"]), None),
                60,
                "the gateway told the hub is short of disk",
            )
            assert link["state"] == "down" and "reserve" in link["detail"]
            assert hub.committed() == {}
            # Room again: the gateway resumes and the study commits whole.
            filler.unlink()
            subprocess.run(["mount", "-o", "remount,size=96m", str(small_disk)], check=True)
            wait_until(lambda: hub.committed().get(study) == len(files), 120, "study committed")
        assert httpx.get(f"{hub.url}/healthz").json()["status"] == "ok"


def _db(tmp_path: Path) -> str:
    """The hub's database beside the small disk: what fills up here is uploads and archive
    (a hub keeps its database on the same disk in production; the reserve is for it)."""
    return f"sqlite:///{tmp_path / 'hub.sqlite3'}"


def _links(gw: InProcessGateway) -> list[dict[str, object]]:
    from dicom_gateway.station.service import gateway_status

    return list(gateway_status(gw.state, gw.settings.quiet_period_s)["links"])


def test_a_write_that_fills_the_disk_keeps_the_exact_offset(
    tmp_path: Path, small_disk: Path
) -> None:
    """ENOSPC in the middle of a PATCH (another writer filled the disk after the hub checked
    its room): 507, the offset names exactly the bytes kept, and the upload resumes from
    there once there is room."""
    import base64
    import hashlib

    with InProcessHub(small_disk / "hub", disk_reserve_mb=0, database_url=_db(tmp_path)) as hub:
        token = hub.add_station("tram-enospc")
        headers = {"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
        body = os.urandom(6 * 2**20)
        meta = ",".join(
            f"{k} {base64.b64encode(v.encode()).decode()}"
            for k, v in {
                "study_uid": "1.2.3.4",
                "bundle_sha256": hashlib.sha256(body).hexdigest(),
            }.items()
        )
        created = httpx.post(
            f"{hub.url}/api/v1/ingest/uploads",
            headers={**headers, "Upload-Length": str(len(body)), "Upload-Metadata": meta},
        )
        assert created.status_code == 201, created.text
        url = f"{hub.url}{created.headers['Location']}"
        patch = {**headers, "Content-Type": "application/offset+octet-stream"}
        filler = small_disk / "filler"

        def stream() -> Iterator[bytes]:
            yield body[: 2 * 2**20]
            # Only once the hub has passed its room check and is writing this body (filling
            # earlier would make the check answer 507 before any byte is written).
            uploads = small_disk / "hub" / "uploads"
            wait_until(
                lambda: any(f.stat().st_size > 0 for f in uploads.iterdir()),
                30,
                "the hub writing the first part of the body",
            )
            # Someone else takes the disk while the body is on its way (racing the hub's own
            # writes: whoever is second gets ENOSPC, and the filler just stops there).
            free = shutil.disk_usage(small_disk).free
            with filler.open("wb", buffering=0) as fh:
                for _ in range(max(free - 2**20, 0) // 2**16):
                    try:
                        fh.write(b"\0" * 2**16)
                    except OSError:
                        break
            for at in range(2 * 2**20, len(body), 2**18):
                yield body[at : at + 2**18]

        full = httpx.patch(url, headers={**patch, "Upload-Offset": "0"}, content=stream())
        assert full.status_code == 507 and "disk full" in full.text, full.text
        kept = int(httpx.head(url, headers=headers).headers["Upload-Offset"])
        assert 0 <= kept < len(body)
        [upload_file] = (small_disk / "hub" / "uploads").iterdir()
        assert upload_file.stat().st_size == kept
        assert upload_file.read_bytes() == body[:kept]
        filler.unlink()
        rest = httpx.patch(
            url, headers={**patch, "Upload-Offset": str(kept)}, content=body[kept:], timeout=60
        )
        # All of it arrived, in order (the sha256 matched): the hub then finds it is not a
        # valid bundle and rejects it (460) -- the point here is the exact resume.
        assert rest.status_code == 460, rest.text
        assert "sha256" not in rest.text
