"""People sign in (issue 10, first part): `telerad hub user ...`, the OAuth2 token endpoint,
refresh rotation, rate limits, and a disabled user refused at once with a live token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.telerad_procs import InProcessHub

ROSTER = """
radiologists:
  - key: dr.lan
    modalities: [CT, CR]
    licences: [VN]
    shifts: ["daily 00:00-24:00"]
stations:
  - name: tram-1
    jurisdiction: VN-HN
    language: vi
"""


def _cli(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", "hub", "user", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


@pytest.fixture
def hub(tmp_path: Path) -> InProcessHub:
    roster = tmp_path / "roster.yaml"
    roster.write_text(ROSTER)
    return InProcessHub(tmp_path / "hub", roster_file=roster)


def _token(hub: InProcessHub, username: str, password: str) -> httpx.Response:
    return httpx.post(
        f"{hub.url}/api/auth/token", data={"username": username, "password": password}
    )


def test_users_sign_in_refresh_and_are_refused_once_disabled(hub: InProcessHub) -> None:
    data_dir = hub.settings.data_dir
    with hub:
        made = _cli(data_dir, "add", "lan", "--role", "radiologist", "--radiologist", "dr.lan")
        assert made.returncode == 0, made.stderr
        password = made.stdout.strip()
        assert len(password) >= 16
        given = _cli(
            data_dir, "add", "nurse", "--role", "clinic", "--station", "tram-1",
            "--password-stdin", stdin="correct horse battery\n",
        )  # fmt: skip
        assert given.returncode == 0 and "added" in given.stdout
        # Bindings are checked: a radiologist key on the roster, an existing station.
        unknown = _cli(data_dir, "add", "x", "--role", "radiologist", "--radiologist", "dr.no")
        assert unknown.returncode == 1 and "dr.no" in unknown.stderr
        bad = _cli(data_dir, "add", "y", "--role", "clinic", "--station", "nowhere")
        assert bad.returncode == 1 and "no station" in bad.stderr
        assert _cli(data_dir, "add", "z", "--role", "clinic").returncode == 1
        listed = _cli(data_dir, "list", "--json")
        assert '"username": "lan"' in listed.stdout and password not in listed.stdout

        answer = _token(hub, "lan", password)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["token_type"] == "bearer" and body["expires_in"] == 900
        auth = {"Authorization": f"Bearer {body['access_token']}"}
        me = httpx.get(f"{hub.url}/api/auth/me", headers=auth).json()
        assert me == {"username": "lan", "role": "radiologist", "radiologist": "dr.lan",
                      "station": None}  # fmt: skip
        nurse = _token(hub, "nurse", "correct horse battery").json()
        nurse_auth = {"Authorization": f"Bearer {nurse['access_token']}"}
        assert httpx.get(f"{hub.url}/api/auth/me", headers=nurse_auth).json()["station"] == (
            "tram-1"
        )

        # Refresh rotates: the new pair works, the old refresh token works no more.
        refreshed = httpx.post(
            f"{hub.url}/api/auth/token",
            data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
        )
        assert refreshed.status_code == 200
        again = httpx.post(
            f"{hub.url}/api/auth/token",
            data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
        )
        assert again.status_code == 401
        new_auth = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
        assert httpx.get(f"{hub.url}/api/auth/me", headers=new_auth).status_code == 200

        # Disabled: refused at once, live tokens included, and no new sign-in.
        assert _cli(data_dir, "disable", "lan").returncode == 0
        refused = httpx.get(f"{hub.url}/api/auth/me", headers=new_auth)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert _token(hub, "lan", password).status_code == 401
        assert _cli(data_dir, "enable", "lan").returncode == 0
        assert httpx.get(f"{hub.url}/api/auth/me", headers=new_auth).status_code == 401
        assert _token(hub, "lan", password).status_code == 200

        # A new password ends every session.
        assert httpx.get(f"{hub.url}/api/auth/me", headers=nurse_auth).status_code == 200
        changed = _cli(data_dir, "password", "nurse", "--password-stdin", stdin="another one 42\n")
        assert changed.returncode == 0
        assert httpx.get(f"{hub.url}/api/auth/me", headers=nurse_auth).status_code == 401
        assert _token(hub, "nurse", "another one 42").status_code == 200

        # Logout revokes the token it was called with.
        fresh = _token(hub, "nurse", "another one 42").json()["access_token"]
        bearer = {"Authorization": f"Bearer {fresh}"}
        assert httpx.post(f"{hub.url}/api/auth/logout", headers=bearer).status_code == 204
        assert httpx.get(f"{hub.url}/api/auth/me", headers=bearer).status_code == 401


def test_failed_sign_ins_are_rate_limited_per_user(hub: InProcessHub) -> None:
    with hub:
        made = _cli(hub.settings.data_dir, "add", "admin", "--role", "admin")
        password = made.stdout.strip()
        for _ in range(5):
            assert _token(hub, "admin", "wrong password!").status_code == 401
        limited = _token(hub, "admin", password)  # even the right one, for a while
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
        # Unknown users get the same answer as a wrong password.
        assert _token(hub, "nobody", "wrong password!").status_code == 401
        assert httpx.get(f"{hub.url}/api/auth/me").status_code == 401
        assert httpx.post(f"{hub.url}/api/auth/token", data={"grant_type": "x"}).status_code == 400
