"""The audit trail over real HTTP (issue 10): sign-ins, refusals and rate limits are recorded
with the caller's address; admins read them at /api/audit, page by cursor; the hub's stop
writes what was still queued, and `telerad hub audit` lists it."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from reading_queue.accounts import Accounts, Principal
from reading_queue.audit import INSTANCES_ACCESSED, AuditTrail, query_events
from reading_queue.models import make_engine
from tests.support.peers import PostgresCluster
from tests.support.telerad_procs import InProcessHub, wait_until

ADMIN_PW = "admin password 1"
LAN_PW = "lan password 12"


def _sign_in(hub: InProcessHub, username: str, password: str) -> httpx.Response:
    return httpx.post(
        f"{hub.url}/api/auth/token", data={"username": username, "password": password}
    )


def _audit_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", "hub", "audit", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sign_ins_are_audited_and_admins_read_the_trail(tmp_path: Path) -> None:
    hub = InProcessHub(tmp_path / "hub")
    with hub:
        accounts = Accounts(hub.ingest.engine)
        accounts.add_user("root", "admin", ADMIN_PW)
        accounts.add_user("lan", "radiologist", LAN_PW, radiologist="dr.lan")

        lan = _sign_in(hub, "lan", LAN_PW)
        assert lan.status_code == 200
        assert _sign_in(hub, "lan", "not her password").status_code == 401
        for _ in range(5):
            assert _sign_in(hub, "ghost", "guessing away").status_code == 401
        assert _sign_in(hub, "ghost", "guessing away").status_code == 429
        refreshed = httpx.post(
            f"{hub.url}/api/auth/token",
            data={"grant_type": "refresh_token", "refresh_token": lan.json()["refresh_token"]},
        )
        assert refreshed.status_code == 200
        lan_auth = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
        root = _sign_in(hub, "root", ADMIN_PW).json()
        root_auth = {"Authorization": f"Bearer {root['access_token']}"}

        # Only admins read the trail.
        assert httpx.get(f"{hub.url}/api/audit").status_code == 401
        assert httpx.get(f"{hub.url}/api/audit", headers=lan_auth).status_code == 403

        def audit(**params: Any) -> dict[str, Any]:
            answer = httpx.get(f"{hub.url}/api/audit", headers=root_auth, params=params)
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        # The writer batches every 0.5 s: the rows come soon, not at once.
        wait_until(
            lambda: len(audit(event_type="auth.login")["events"]) == 9,  # lan 2, ghost 6, root 1
            10,
            "the sign-ins in the audit trail",
        )
        lans = audit(username="lan")["events"]
        assert [(e["event_type"], e["outcome"], e["role"]) for e in lans] == [
            ("auth.login", 0, "radiologist"),
            ("auth.login", 4, ""),
            ("auth.refresh", 0, "radiologist"),
        ]
        assert {e["address"] for e in lans} == {"127.0.0.1"}
        assert {e["action"] for e in lans} == {"User Authentication"}
        ghost = audit(username="ghost")["events"]
        assert [(e["outcome"], e["action"]) for e in ghost] == [(4, "User Authentication")] * 5 + [
            (8, "Security Alert")
        ]
        assert [e["outcome"] for e in audit(outcome=8)["events"]] == [8]

        # Cursor pages: ascending ids, none twice, `next` null on the last page.
        ids: list[int] = []
        after: int | None = None
        while True:
            params: dict[str, Any] = {"event_type": "auth.login", "limit": 3}
            if after is not None:
                params["after_id"] = after
            page = audit(**params)
            ids.extend(e["id"] for e in page["events"])
            after = page["next"]
            if after is None:
                break
        assert len(ids) == 9 and ids == sorted(set(ids))
        future = datetime.fromtimestamp(2e9, UTC).isoformat()
        assert audit(since=future)["events"] == []
        too_many = httpx.get(f"{hub.url}/api/audit", headers=root_auth, params={"limit": 5000})
        assert too_many.status_code == 422

        # Signing out is recorded too; the stop writes what is still queued.
        assert httpx.post(f"{hub.url}/api/auth/logout", headers=root_auth).status_code == 204

    listed = _audit_cli(hub.settings.data_dir, "--user", "root", "--json")
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)
    assert [e["event_type"] for e in events][-1] == "auth.logout"
    assert "audit.read" in {e["event_type"] for e in events}  # reading the trail is audited
    assert {e["action"] for e in events if e["event_type"] == "audit.read"} == {"Audit Log Used"}
    ghost_cli = _audit_cli(
        hub.settings.data_dir, "--user", "ghost", "--type", "auth.login", "--json"
    )
    assert [e["outcome"] for e in json.loads(ghost_cli.stdout)] == [4] * 5 + [8]
    table = _audit_cli(hub.settings.data_dir, "--user", "lan", "--limit", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "# Audit trail" and len(lines) == 4  # title, header, two rows
    assert "User Authentication (E)" in lines[2]
    bad = _audit_cli(hub.settings.data_dir, "--since", "yesterday")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


@pytest.mark.needs_postgres
def test_the_trail_is_append_only_on_postgresql() -> None:
    with PostgresCluster() as pg:
        engine = make_engine(pg.create_database("telerad_audit"))
        try:
            trail = AuditTrail(engine)
            who = Principal(1, "lan", "radiologist", "dr.lan", None)
            trail.record(who, "", "study.read", INSTANCES_ACCESSED, study_uid="1.2.3")
            trail.close()
            for sql in (
                "UPDATE audit_events SET username = 'someone'",
                "DELETE FROM audit_events",
                "TRUNCATE audit_events",
            ):
                with pytest.raises(DatabaseError, match="append-only"), engine.begin() as conn:
                    conn.execute(text(sql))
            assert [(r.username, r.study_uid) for r in query_events(engine)] == [("lan", "1.2.3")]
        finally:
            engine.dispose()
