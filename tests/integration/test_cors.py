"""CORS: off by default (a page elsewhere gets no access), exact origins when configured,
``*`` and non-origins refused at start."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from reading_queue.settings import HubSettings
from tests.support.telerad_procs import InProcessHub

VIEWER = "https://viewer.example.org"
PREFLIGHT = {
    "Origin": VIEWER,
    "Access-Control-Request-Method": "GET",
    "Access-Control-Request-Headers": "authorization,accept",
}


def test_no_cross_origin_access_by_default(tmp_path: Path) -> None:
    with InProcessHub(tmp_path / "hub") as hub:
        pre = httpx.options(f"{hub.url}/dicom-web/studies", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in pre.headers
        got = httpx.get(f"{hub.url}/api/auth/me", headers={"Origin": VIEWER})
        assert got.status_code == 401
        assert "access-control-allow-origin" not in got.headers


def test_configured_origins_only(tmp_path: Path) -> None:
    with InProcessHub(tmp_path / "hub", cors_origins=[VIEWER + "/"]) as hub:
        pre = httpx.options(f"{hub.url}/dicom-web/studies", headers=PREFLIGHT)
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == VIEWER
        assert pre.headers["access-control-allow-credentials"] == "true"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        got = httpx.get(f"{hub.url}/api/auth/me", headers={"Origin": VIEWER})
        assert got.headers["access-control-allow-origin"] == VIEWER
        other = httpx.options(
            f"{hub.url}/dicom-web/studies", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    "origin", ["*", "viewer.example.org", "https://viewer.example.org/app", "ftp://x.example"]
)
def test_what_is_not_an_origin_is_refused(tmp_path: Path, origin: str) -> None:
    with pytest.raises(ValidationError, match="cors_origins"):
        HubSettings(data_dir=tmp_path, cors_origins=[origin])
