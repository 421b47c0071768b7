"""Every patient-data route × every kind of caller, on a study that came in over DICOM:

- who may see the study gets it; who may not (another station's clinic, a radiologist not
  eligible for it) gets exactly the answer a UID that does not exist gets — same status,
  same body once the UIDs are swapped;
- nobody and a disabled user with a live token get 401 everywhere;
- every successful read of patient data is one audit row naming the reader and the study.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from reading_queue.accounts import Accounts
from sample_studies.generate import make_cr
from tests.support.peers import PostgresCluster, postgres_bin_dir, storescu
from tests.support.telerad_procs import InProcessHub, wait_until

ROSTER = """
radiologists:
  - key: dr.vn
    modalities: [CT, CR]
    licences: [VN]
    languages: [vi]
    shifts: ["daily 00:00-24:00"]
  - key: dr.kh
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
#: caller -> may they see a tram-1 study in the pool?
CALLERS = {"boss": True, "nurse1": True, "lan": True, "nurse2": False, "sok": False}
MISSING = ("2.25.1111", "2.25.2222", "2.25.3333")
FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'

#: (path template, Accept) of every read of one study's data
READS = [
    ("/api/studies/{s}", None),
    ("/dicom-web/studies/{s}/series", None),
    ("/dicom-web/studies/{s}/instances", None),
    ("/dicom-web/studies/{s}/series/{se}/instances", None),
    ("/dicom-web/studies/{s}/metadata", None),
    ("/dicom-web/studies/{s}/series/{se}/metadata", None),
    ("/dicom-web/studies/{s}/series/{se}/instances/{i}/metadata", None),
    ("/dicom-web/studies/{s}", None),
    ("/dicom-web/studies/{s}/series/{se}", None),
    ("/dicom-web/studies/{s}/series/{se}/instances/{i}", None),
    ("/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/1", FRAMES),
    ("/dicom-web/studies/{s}/series/{se}/instances/{i}/bulk/7fe00010", None),
    ("/dicom-web/studies/{s}/rendered", None),
    ("/dicom-web/studies/{s}/series/{se}/rendered", None),
    ("/dicom-web/studies/{s}/series/{se}/instances/{i}/rendered", None),
    ("/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/1/rendered", None),
    ("/dicom-web/studies/{s}/thumbnail", None),
    ("/dicom-web/studies/{s}/series/{se}/thumbnail", None),
    ("/dicom-web/studies/{s}/series/{se}/instances/{i}/thumbnail", None),
    ("/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/1/thumbnail", None),
]
#: searches: a study that is not yours is simply not in the answer
SEARCHES = [
    ("/dicom-web/studies", {"StudyInstanceUID": "{s}"}),
    ("/dicom-web/series", {"StudyInstanceUID": "{s}"}),
    ("/dicom-web/instances", {"StudyInstanceUID": "{s}"}),
    ("/api/worklist", {}),
]


class Setup:
    def __init__(self, hub: InProcessHub, uids: tuple[str, str, str]) -> None:
        self.hub = hub
        self.uids = uids
        self.tokens: dict[str, str] = {}

    def client(self, user: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.Client(base_url=self.hub.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster | None]:
    if postgres_bin_dir() is None:
        yield None
        return
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.needs_postgres)],
)
def setup(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg: PostgresCluster | None,
) -> Iterator[Setup]:
    tmp: Path = tmp_path_factory.mktemp("matrix")
    database: dict[str, str] = {}
    if request.param == "postgresql":
        assert pg is not None
        database["database_url"] = pg.create_database("matrix")
    roster = tmp / "roster.yaml"
    roster.write_text(ROSTER)
    cr = make_cr(tmp / "push", seed=11, rows=512, columns=410)
    ds = dcmread(cr, stop_before_pixels=True)
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    with InProcessHub(
        tmp / "hub", roster_file=roster, assignment_mode="pull", release_settle_s=0.5, **database
    ) as hub:
        accounts = Accounts(hub.hub.ingest.engine)
        accounts.add_user("boss", "admin", PASSWORD)
        accounts.add_user("nurse1", "clinic", PASSWORD, station="tram-1")
        accounts.add_user("nurse2", "clinic", PASSWORD, station="tram-kh")
        accounts.add_user("lan", "radiologist", PASSWORD, radiologist="dr.vn")
        accounts.add_user("sok", "radiologist", PASSWORD, radiologist="dr.kh")
        accounts.add_user("gone", "radiologist", PASSWORD, radiologist="dr.vn")
        hub.ingest.add_source("HOSP_A", "tram-1", "127.0.0.1")
        sent = storescu([cr], "127.0.0.1", hub.hub.inbox.listener.port, hub.settings.aet, "HOSP_A")
        assert sent.returncode == 0, sent.stderr[-2000:]
        wait_until(lambda: uids[0] in hub.committed(), 60, "the study at the hub")
        wl = hub.hub.worklist
        wait_until(lambda: _state(wl, uids[0]) == "ready", 60, "the study ready on the worklist")
        s = Setup(hub, uids)
        for user in [*CALLERS, "gone"]:
            r = httpx.post(
                f"{hub.url}/api/auth/token", data={"username": user, "password": PASSWORD}
            )
            assert r.status_code == 200, r.text
            s.tokens[user] = r.json()["access_token"]
        accounts.set_active("gone", False)  # a live token, a disabled user
        yield s


def _state(wl: Any, uid: str) -> str | None:
    try:
        return str(wl.study(uid).state)
    except Exception:
        return None


def _fill(template: str, uids: tuple[str, str, str]) -> str:
    s, se, i = uids
    return template.format(s=s, se=se, i=i)


def _swap(text: str, a: tuple[str, str, str], b: tuple[str, str, str]) -> str:
    for x, y in zip(a, b, strict=True):
        text = text.replace(x, y)
    return text


def _get(c: httpx.Client, path: str, accept: str | None, params: Any = None) -> httpx.Response:
    return c.get(path, headers={"Accept": accept} if accept else {}, params=params)


def test_reads_not_yours_answer_like_missing(setup: Setup) -> None:
    reads: Counter[str] = Counter()
    for user, may in CALLERS.items():
        with setup.client(user) as c:
            for template, accept in READS:
                real = _get(c, _fill(template, setup.uids), accept)
                if may:
                    assert real.status_code == 200, (user, template, real.status_code, real.text)
                    assert real.content, (user, template)
                    reads[user] += 1
                    continue
                fake = _get(c, _fill(template, MISSING), accept)
                assert real.status_code == fake.status_code == 404, (user, template)
                assert _swap(real.text, setup.uids, MISSING) == fake.text, (user, template)
                assert real.headers["content-type"] == fake.headers["content-type"]
            for path, params in SEARCHES:
                found = c.get(path, params={k: _fill(v, setup.uids) for k, v in params.items()})
                assert found.status_code == 200, (user, path, found.text)
                assert (setup.uids[0] in found.text) is may, (user, path)
                if may:
                    reads[user] += 1
    # every successful read above is one audit row naming the reader and the study
    trail = setup.hub.hub.app.state.audit
    trail.flush()
    for user in CALLERS:
        rows = trail.query(username=user, study_uid=setup.uids[0], limit=1000)
        ok = [r for r in rows if r.outcome == 0]
        assert len(ok) == reads[user], (user, reads[user], Counter(r.event_type for r in ok))
    # and a refusal is on record too, without confirming the UID as an access
    refused = trail.query(username="nurse2", outcome=4, limit=1000)
    assert refused, "refused reads are audited"


ACTIONS = [
    ("/api/studies/{s}/claim", None),
    ("/api/studies/{s}/open", None),
    ("/api/studies/{s}/heartbeat", None),
    ("/api/studies/{s}/release", {}),
    ("/api/studies/{s}/priority", {"priority": "urgent"}),
    ("/api/studies/{s}/cancel", {"reason": "test"}),
    ("/api/studies/{s}/assign", {"radiologist": "dr.vn"}),
    ("/api/studies/{s}/merge", {"into": "2.25.4444"}),
]


def test_actions_not_yours_answer_like_missing(setup: Setup) -> None:
    """Those who may not see the study: the same answer as for a missing one (or the
    same 403 before any lookup, for a role that may not act at all)."""
    for user in (u for u, may in CALLERS.items() if not may):
        with setup.client(user) as c:
            for template, body in ACTIONS:
                real = c.post(_fill(template, setup.uids), json=body)
                fake = c.post(_fill(template, MISSING), json=body)
                assert real.status_code == fake.status_code, (user, template)
                assert real.status_code in (403, 404), (user, template, real.text)
                assert _swap(real.text, setup.uids, MISSING) == fake.text, (user, template)
    assert _state(setup.hub.hub.worklist, setup.uids[0]) == "ready"  # nothing happened


def test_nobody_and_a_disabled_user_are_refused_everywhere(setup: Setup) -> None:
    paths = [(_fill(t, setup.uids), a) for t, a in READS] + [(p, None) for p, _ in SEARCHES]
    for user in (None, "gone"):
        with setup.client(user) as c:
            for path, accept in paths:
                r = _get(c, path, accept)
                assert r.status_code == 401, (user, path, r.status_code)
            for template, body in ACTIONS:
                assert c.post(_fill(template, setup.uids), json=body).status_code == 401
