"""The prebuilt OHIF viewer the hub serves, in a headless Chromium, on studies that came
DCMTK storescu -> station gateway -> hub: a radiologist signs in on the hub's page, lands in
``/viewer?StudyInstanceUIDs=…``, and the image viewport shows pixels for a CT and a CR, with
no failed request and no error answer in the browser's network log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from reading_queue.accounts import Accounts
from sample_studies.generate import make_cr, make_ct_series
from tests.support.browser import chromium_page, image_spread, sign_in
from tests.support.peers import require_peer, storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until
from viewer_api.routes import viewer

ROSTER = """
radiologists:
  - key: dr.lan
    modalities: [CT, CR]
    licences: [VN]
    languages: [vi, km]
    max_concurrent: 10
    shifts: ["daily 00:00-24:00"]
stations:
  - name: tram-1
    institution: Tram Y Te 1
    jurisdiction: VN-HN
    language: vi
"""
PASSWORD = "correct horse battery staple"


def _viewport_shows_an_image(page: Any, deadline_s: float = 90) -> tuple[float, int]:
    """Screenshots of the first image viewport until it holds an image (many grey levels)."""
    canvas = page.locator("canvas.cornerstone-canvas").first
    canvas.wait_for(state="visible", timeout=int(deadline_s * 1000))
    end = time.monotonic() + deadline_s
    spread = (0.0, 0)
    while time.monotonic() < end:
        spread = image_spread(canvas.screenshot())
        if spread[0] > 10 and spread[1] > 32:
            return spread
        time.sleep(0.5)
    raise AssertionError(f"the viewport shows no image after {deadline_s} s: {spread}")


@pytest.mark.needs_dcmtk
@pytest.mark.needs_chromium
@pytest.mark.slow
def test_ohif_shows_a_ct_and_a_cr_from_the_hub(tmp_path: Path) -> None:
    require_peer(
        "OHIF viewer",
        viewer.viewer_installed(viewer.viewer_dir()),
        "run scripts/install_viewer.sh",
    )
    ct = make_ct_series(tmp_path / "push" / "ct", 16, seed=7)
    cr = make_cr(tmp_path / "push" / "cr", seed=7, rows=1024, columns=820)
    studies = {
        "CT": str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID),
        "CR": str(dcmread(cr, stop_before_pixels=True).StudyInstanceUID),
    }
    roster = tmp_path / "roster.yaml"
    roster.write_text(ROSTER)
    with InProcessHub(tmp_path / "hub", roster_file=roster) as hub:
        Accounts(hub.hub.ingest.engine).add_user(
            "lan", "radiologist", PASSWORD, radiologist="dr.lan"
        )
        token = hub.hub.ingest.rotate_token("tram-1")
        with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
            res = storescu([tmp_path / "push"], "127.0.0.1", gw.port, gw.aet, "MODALITY")
            assert res.returncode == 0, res.stderr[-3000:]
            wait_until(
                lambda: set(studies.values()) <= set(hub.committed()), 120, "studies at the hub"
            )
        access = hub.hub.app.state.access
        lan = Accounts(hub.hub.ingest.engine)
        who = lan.principal(lan.sign_in("lan", PASSWORD, "127.0.0.1").access_token)
        assert who is not None
        wait_until(
            lambda: all(access.can_see(who, uid) for uid in studies.values()),
            60,
            "the studies on dr.lan's worklist",
        )

        with chromium_page() as (page, log):
            for i, (kind, uid) in enumerate(studies.items()):
                target = f"/viewer?StudyInstanceUIDs={uid}"
                if i == 0:
                    sign_in(page, hub.url, "lan", PASSWORD, target)
                else:
                    page.goto(f"{hub.url}{target}")
                spread = _viewport_shows_an_image(page)
                assert spread[0] > 10, (kind, spread)
                page.screenshot(path=str(tmp_path / f"ohif-{kind}.png"))
            assert not log.problems(), log.problems()
            frames = [u for u in log.requests if "/frames/" in u]
            assert any(studies["CT"] in u for u in frames)
            assert any(studies["CR"] in u for u in frames)

        # what the browser read is in the audit trail, as the radiologist
        hub.hub.app.state.audit.flush()
        rows = hub.hub.app.state.audit.query(username="lan", limit=1000)
        read = {r.study_uid for r in rows if r.event_type.startswith("dicomweb.")}
        assert set(studies.values()) <= read
