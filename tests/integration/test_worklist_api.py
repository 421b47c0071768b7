"""The radiologist's API over real HTTP: worklist views per role with cursor pages, pull,
claim/open/heartbeat/release, admin actions with 409 on a conflict, one study's page with
journey and priors, not-yours answered as missing, every read audited, and a STAT page
arriving by server-sent events."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from reading_queue.accounts import Accounts
from reading_queue.models import Study
from tests.support.telerad_procs import InProcessHub, wait_until
from tests.support.worklist_data import NewStudy, announce_studies

ROSTER = """
radiologists:
  - key: dr.lan
    modalities: [CT, CR]
    licences: [VN]
    languages: [vi]
    max_concurrent: 3
    shifts: ["daily 00:00-24:00"]
  - key: dr.sok
    modalities: [CR]
    licences: [KH]
    languages: [km]
    shifts: ["daily 00:00-24:00"]
stations:
  - name: tram-1
    institution: Tram Y Te 1
    jurisdiction: VN-HN
    language: vi
  - name: tram-kh
    institution: Kampot
    jurisdiction: KH-12
    language: km
"""

PASSWORD = "correct horse battery staple"


class Hub:
    def __init__(self, hub: InProcessHub) -> None:
        self.hub = hub
        self.url = hub.url
        self.tokens: dict[str, str] = {}

    def as_(self, username: str) -> httpx.Client:
        if username not in self.tokens:
            r = httpx.post(
                f"{self.url}/api/auth/token", data={"username": username, "password": PASSWORD}
            )
            assert r.status_code == 200, r.text
            self.tokens[username] = r.json()["access_token"]
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[username]}"}
        )

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        self.hub.hub.app.state.audit.flush()
        with self.as_("boss") as c:
            r = c.get("/api/audit", params={**filters, "limit": 1000})
        assert r.status_code == 200, r.text
        return list(r.json()["events"])


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    roster = tmp_path / "roster.yaml"
    roster.write_text(ROSTER)
    with InProcessHub(tmp_path / "hub", roster_file=roster, assignment_mode="pull") as h:
        accounts = Accounts(h.hub.ingest.engine)
        accounts.add_user("lan", "radiologist", PASSWORD, radiologist="dr.lan")
        accounts.add_user("sok", "radiologist", PASSWORD, radiologist="dr.sok")
        accounts.add_user("nurse1", "clinic", PASSWORD, station="tram-1")
        accounts.add_user("nurse2", "clinic", PASSWORD, station="tram-kh")
        accounts.add_user("boss", "admin", PASSWORD)
        yield Hub(h)


VN = [f"2.25.100.{i}" for i in range(7)]
KH = [f"2.25.200.{i}" for i in range(3)]


def _load(hub: Hub) -> None:
    """7 studies from tram-1 (one CT STAT), 3 CR from tram-kh; VN[0] and VN[1] are the same
    patient (VN[1] is the prior), and so is KH[0] (another institution: not a prior)."""
    wl = hub.hub.hub.worklist
    t0 = time.time() - 3600
    studies = [
        NewStudy(uid, "tram-1", modality="CT" if i == 0 else "CR", priority=0 if i == 0 else 2)
        for i, uid in enumerate(VN)
    ] + [NewStudy(uid, "tram-kh") for uid in KH]
    announce_studies(wl.engine, studies, t0)
    wl.consume_events(now=t0)
    with wl.engine.begin() as conn:
        for uid in (VN[0], VN[1], KH[0]):
            conn.execute(update(Study).where(Study.study_uid == uid).values(patient_key="pk-a"))
        # VN[1]: an older study of the same patient, already reported by someone else
        conn.execute(
            update(Study)
            .where(Study.study_uid == VN[1])
            .values(state="final", assignee="dr.other", received_at=t0 - 86400)
        )


def _uids(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [s["study_uid"] for s in answer.json()["studies"]]


def test_each_role_sees_its_own_worklist_in_pages(hub: Hub) -> None:
    _load(hub)
    open_vn = [u for u in VN if u != VN[1]]
    with hub.as_("lan") as lan, hub.as_("sok") as sok, hub.as_("boss") as boss:
        assert set(_uids(lan.get("/api/worklist"))) == set(open_vn)
        assert set(_uids(sok.get("/api/worklist"))) == set(KH)
        with hub.as_("nurse1") as n1:
            assert set(_uids(n1.get("/api/worklist"))) == set(open_vn)
            assert set(_uids(n1.get("/api/worklist", params={"state": "final"}))) == {VN[1]}
        assert set(_uids(boss.get("/api/worklist"))) == set(open_vn) | set(KH)

        # most urgent first: the STAT CT heads the list; SLA minutes are counted down
        first = lan.get("/api/worklist").json()["studies"][0]
        assert first["study_uid"] == VN[0] and first["priority"] == "stat"
        assert first["sla_minutes_left"] < 0 and first["overdue"] is True

        # cursor pages: every study exactly once, in the same order as one big page
        whole = _uids(boss.get("/api/worklist", params={"limit": 200}))
        paged: list[str] = []
        cursor = None
        while True:
            r = boss.get(
                "/api/worklist", params={"limit": 3, **({"cursor": cursor} if cursor else {})}
            )
            paged += _uids(r)
            cursor = r.json()["next"]
            if cursor is None:
                break
        assert paged == whole and len(paged) == len(set(paged)) == 9
        newest = _uids(boss.get("/api/worklist", params={"sort": "-received", "limit": 200}))
        assert set(newest) == set(whole)

        # filters
        assert _uids(boss.get("/api/worklist", params={"priority": "stat"})) == [VN[0]]
        assert _uids(boss.get("/api/worklist", params={"modality": "ct"})) == [VN[0]]
        assert set(_uids(boss.get("/api/worklist", params={"station": "tram-kh"}))) == set(KH)
        assert set(_uids(boss.get("/api/worklist", params={"state": "ready,final"}))) == set(
            VN
        ) | set(KH)

        # bad input: 400 / 422 with a message, never 500
        for params in (
            {"priority": "soon"},
            {"state": "lost"},
            {"cursor": "not-a-cursor"},
            {"cursor": "WzEsMl0"},  # [1,2]: wrong shape for this sort
            {"sort": "name"},
            {"limit": "0"},
        ):
            r = boss.get("/api/worklist", params=params)
            assert r.status_code in (400, 422), (params, r.status_code, r.text)
            assert r.json()["detail"], params
        assert httpx.get(f"{hub.url}/api/worklist").status_code == 401

    # a listing shows patient names: each study it returned is audited as read
    rows = hub.audit(username="sok", event_type="worklist.list")
    assert {r["study_uid"] for r in rows} == set(KH)
    assert all(r["action"] == "Query" and r["outcome"] == 0 for r in rows)


def test_reading_flow_conflicts_and_pull(hub: Hub) -> None:
    _load(hub)
    with hub.as_("lan") as lan, hub.as_("sok") as sok, hub.as_("boss") as boss:
        uid = VN[2]
        # sok may not see a Vietnamese study: 404 like a missing UID, identical body
        mine_not = sok.post(f"/api/studies/{uid}/claim")
        missing = sok.post("/api/studies/2.25.999/claim")
        assert mine_not.status_code == missing.status_code == 404
        assert mine_not.json()["detail"].replace(uid, "X") == missing.json()["detail"].replace(
            "2.25.999", "X"
        )

        claimed = lan.post(f"/api/studies/{uid}/claim")
        assert claimed.status_code == 200, claimed.text
        assert claimed.json()["study"]["state"] == "assigned"
        again = lan.post(f"/api/studies/{uid}/claim")
        assert again.status_code == 409 and again.json()["state"] == "assigned"
        opened = lan.post(f"/api/studies/{uid}/open")
        assert opened.status_code == 200 and opened.json()["study"]["state"] == "in_progress"
        beat = lan.post(f"/api/studies/{uid}/heartbeat")
        assert beat.status_code == 200 and beat.json()["until"] > time.time()
        released = lan.post(f"/api/studies/{uid}/release", json={"reason": "needs neuro"})
        assert released.status_code == 200 and released.json()["study"]["state"] == "ready"
        stale = lan.post(f"/api/studies/{uid}/heartbeat")
        assert stale.status_code == 409 and stale.json()["state"] == "ready"
        assert lan.post(f"/api/studies/{uid}/release", json={"bogus": 1}).status_code == 422
        assert lan.post(f"/api/studies/{uid}/release", content=b"{not json").status_code == 422

        # pull: the engine's choice is the STAT
        nxt = lan.post("/api/worklist/next")
        assert nxt.status_code == 200 and nxt.json()["study"]["study_uid"] == VN[0]
        assert nxt.json()["study"]["assignee"] == "dr.lan"
        # radiologist-only and admin-only routes
        with hub.as_("nurse1") as n1:
            assert n1.post("/api/worklist/next").status_code == 403
            assert n1.post(f"/api/studies/{VN[3]}/claim").status_code == 403
        assert lan.post(f"/api/studies/{VN[3]}/cancel", json={"reason": "x"}).status_code == 403

        # admin: assign (eligibility checked, force recorded), priority, cancel, merge
        not_eligible = boss.post(f"/api/studies/{VN[3]}/assign", json={"radiologist": "dr.sok"})
        assert not_eligible.status_code == 409 and not_eligible.json()["state"] == "ready"
        forced = boss.post(
            f"/api/studies/{VN[3]}/assign", json={"radiologist": "dr.sok", "force": True}
        )
        assert forced.status_code == 200 and forced.json()["study"]["assignee"] == "dr.sok"
        unknown = boss.post(f"/api/studies/{VN[4]}/assign", json={"radiologist": "dr.nobody"})
        assert unknown.status_code == 400
        prio = boss.post(f"/api/studies/{VN[4]}/priority", json={"priority": "urgent"})
        assert prio.status_code == 200 and prio.json()["study"]["priority"] == "urgent"
        assert (
            boss.post(f"/api/studies/{VN[4]}/priority", json={"priority": "now"}).status_code == 422
        )
        assert (
            boss.post(f"/api/studies/{VN[5]}/cancel", json={"reason": "duplicate"}).status_code
            == 200
        )
        twice = boss.post(f"/api/studies/{VN[5]}/cancel", json={"reason": "duplicate"})
        assert twice.status_code == 409 and twice.json()["state"] == "cancelled"
        merged = boss.post(f"/api/studies/{VN[6]}/merge", json={"into": VN[4]})
        assert merged.status_code == 200 and merged.json()["study"]["state"] == "cancelled"
        self_merge = boss.post(f"/api/studies/{VN[4]}/merge", json={"into": VN[4]})
        assert self_merge.status_code == 400, self_merge.text

    actions = {(r["event_type"], r["outcome"]) for r in hub.audit(username="lan")}
    assert {
        ("study.claim", 0),
        ("study.claim", 4),
        ("study.open", 0),
        ("study.heartbeat", 0),
    } <= actions
    assert ("study.release", 0) in actions and ("worklist.next", 0) in actions


def test_one_study_with_journey_and_priors(hub: Hub) -> None:
    _load(hub)
    with hub.as_("lan") as lan, hub.as_("sok") as sok, hub.as_("nurse2") as n2:
        page = lan.get(f"/api/studies/{VN[0]}")
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["study_uid"] == VN[0] and body["priority"] == "stat"
        steps = [j["step"] for j in body["journey"]]
        assert steps[:4] == ["at_hub", "complete_at_hub", "received", "ready"], steps
        # the prior: same patient, same institution; KH[0] (same key, Kampot) is not one
        assert [p["study_uid"] for p in body["priors"]] == [VN[1]]
        # and the prior itself is readable by the reader of the current study
        assert lan.get(f"/api/studies/{VN[1]}").status_code == 200

        # not yours == missing: same status, same message shape
        for caller, uid in ((sok, VN[0]), (n2, VN[0]), (lan, KH[0])):
            theirs = caller.get(f"/api/studies/{uid}")
            nothing = caller.get("/api/studies/2.25.999")
            assert theirs.status_code == nothing.status_code == 404
            assert theirs.json()["detail"] == f"no study {uid}"
            assert nothing.json()["detail"] == "no study 2.25.999"
        assert lan.get("/api/studies/not-a-uid").status_code == 422

    reads = hub.audit(event_type="study.read")
    ok = {(r["username"], r["study_uid"]) for r in reads if r["outcome"] == 0}
    assert {("lan", VN[0]), ("lan", VN[1])} <= ok
    refused = [r for r in reads if r["outcome"] == 4]
    assert {r["username"] for r in refused} == {"sok", "nurse2", "lan"}
    assert all(r["study_uid"] is None for r in refused)  # never confirms the UID exists


def test_a_stat_assigned_to_me_arrives_as_a_server_sent_event(hub: Hub) -> None:
    _load(hub)
    got: list[dict[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        with hub.as_("lan") as lan, lan.stream("GET", "/api/worklist/events", timeout=30) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            ready.set()
            event = ""
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "stat_assigned":
                    got.append(json.loads(line[5:]))
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(10)
    time.sleep(0.5)  # the stream has taken its starting point
    with hub.as_("boss") as boss:
        assert (
            boss.post(f"/api/studies/{VN[0]}/assign", json={"radiologist": "dr.lan"}).status_code
            == 200
        )
    wait_until(lambda: got, 15, "the STAT event")
    assert got[0]["study"]["study_uid"] == VN[0]
    assert got[0]["by"] == "admin:boss"
    with hub.as_("nurse1") as n1:
        assert n1.get("/api/worklist/events").status_code == 403


@pytest.mark.needs_dcmtk
def test_the_journey_starts_at_the_station(hub: Hub, tmp_path: Path) -> None:
    """A study pushed by a modality into a gateway: its page shows when the station got it
    (in the hub's clock), then the hub, then the worklist."""
    from pydicom import dcmread

    from sample_studies.generate import make_cr
    from tests.support.peers import storescu
    from tests.support.telerad_procs import InProcessGateway

    cr = make_cr(tmp_path / "push", seed=3, rows=256, columns=200)
    uid = str(dcmread(cr, stop_before_pixels=True).StudyInstanceUID)
    token = hub.hub.hub.ingest.rotate_token("tram-1")
    with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
        before = time.time()
        assert storescu([cr], "127.0.0.1", gw.port, gw.aet, "MODALITY").returncode == 0
        wait_until(lambda: uid in hub.hub.committed(), 60, "the study at the hub")
    wl = hub.hub.hub.worklist
    wait_until(lambda: _on_worklist(wl, uid), 30, "the study on the worklist")
    with hub.as_("boss") as boss:
        page = boss.get(f"/api/studies/{uid}").json()
    steps = {j["step"]: j["at"] for j in page["journey"]}
    assert list(steps)[:3] == ["at_station", "at_hub", "complete_at_hub"], steps
    assert before - 1 <= steps["at_station"] <= steps["at_hub"] <= steps["complete_at_hub"]


def _on_worklist(wl: Any, uid: str) -> bool:
    try:
        wl.study(uid)
    except Exception:
        return False
    return True
