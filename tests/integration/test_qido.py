"""QIDO-RS over real parts: studies pushed by DCMTK ``storescu`` into two station gateways
reach the hub; ``dicomweb-client`` searches the hub; the same queries go to a real Orthanc
(DICOMweb plugin) holding the same files, and both must find the same studies, series and
instances with the same values for every attribute both return.

What Orthanc 1.10 (Debian, DICOMweb 1.7) does differently, checked in
``test_where_the_hub_and_orthanc_differ``:

* it does not percent-decode query values, so it is sent literal ``*``, ``,``, ``^`` here
  (dicomweb-client sends ``%2A``): and a non-ASCII value cannot reach it at all (raw UTF-8
  in the URL is a 400, percent-encoded it matches nothing). The hub decodes (``+`` is a
  space, as HTML forms and dicomweb-client encode it);
* it ignores unknown parameters (the hub: 400), has no backslash lists (``CT\\CR``), no
  ``YYYY-MM-DD`` dates, and answers ``200 []`` for the series of a study that does not exist
  (the hub: 404, the same as for a study the caller may not see);
* its ``?`` matches one byte, not one character (``Nguy?n*`` misses "Nguyễn");
* it folds case in every attribute, the hub only in names and descriptions (PN, LO
  descriptions; CS codes are upper-cased): ``PatientID=us-0042`` finds nothing at the hub;
* it returns StudyDescription only when asked (includefield), the hub always.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from sqlalchemy import delete

from reading_queue.intake.service import StudyMeta
from reading_queue.models import DicomInstanceIndex, DicomSeriesIndex, DicomStudyIndex
from sample_studies.generate import (
    VIETNAMESE_PATIENT,
    VIETNAMESE_SITE,
    SamplePatient,
    SampleSite,
    make_cr,
    make_ct_series,
)
from tests.support.peers import OrthancServer, PostgresCluster, storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until

ROSTER = """
radiologists:
  - key: dr.kh
    modalities: [CT, CR]
    licences: [KH]
    languages: [km]
    shifts: ["daily 00:00-24:00"]
stations:
  - name: tram-a
    jurisdiction: VN-HN
    language: vi
  - name: tram-b
    jurisdiction: VN-SG
    language: vi
"""
PASSWORD = "correct horse battery staple"
CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
#: never compared: where each server lives
_URL_TAG = "00081190"


def _edit(paths: list[Path], *, charset: str | None = None, **attrs: Any) -> None:
    for path in paths:
        ds = dcmread(path)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def _uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(dcmread(path, stop_before_pixels=True).data_element(keyword).value)  # type: ignore[union-attr]


@dataclass
class Samples:
    root: Path
    #: study key -> (station, files)
    studies: dict[str, tuple[str, list[Path]]] = field(default_factory=dict)

    def uid(self, key: str) -> str:
        return _uid(self.studies[key][1][0])

    def files(self) -> list[Path]:
        return [p for _, files in self.studies.values() for p in files]


def make_samples(root: Path) -> Samples:
    """Four studies of four patients at two stations: a two-series CT of a Vietnamese
    patient (UTF-8), a CR of DOE^JOHN, a CR of another Vietnamese patient, and a CT written
    in Latin-1 (ISO_IR 100)."""
    s = Samples(root)
    a = root / "tram-a"
    ct = make_ct_series(a / "ct", 3, seed=11, matrix=32, series_number=2)
    ct += make_ct_series(
        a / "ct", 2, seed=11, matrix=32, study_uid=_uid(ct[0]), series_number=3,
        file_prefix="CT3_",
    )  # fmt: skip
    assert _uid(ct[0]) == _uid(ct[-1]) and VIETNAMESE_PATIENT.name == "Nguyễn^Thị Hồng"
    s.studies["vn-ct"] = ("tram-a", ct)
    doe = make_cr(
        a / "cr", seed=12, rows=32, columns=32,
        patient=SamplePatient("DOE^JOHN", "US-0042", "19700101", "M", "056Y"),
        site=SampleSite("Trạm Y tế Hà Nội", "HN-CR1", "SMITH^ANNA", "VN"),
        study_description="XQ ngực thẳng (Chest PA)",
    )  # fmt: skip
    _edit([doe], StudyDate="20261015", StudyTime="083000", SeriesDate="20261015", StudyID="42")
    s.studies["doe-cr"] = ("tram-a", [doe])
    b = root / "tram-b"
    tran = make_cr(
        b / "cr", seed=13, rows=32, columns=32,
        patient=SamplePatient("Trần^Văn Bình", "VN-0005555", "19550505", "M", "071Y"),
        site=VIETNAMESE_SITE,
    )  # fmt: skip
    _edit([tran], StudyDate="20250301", StudyTime="101010", SeriesDate="20250301")
    s.studies["tran-cr"] = ("tram-b", [tran])
    muller = make_ct_series(
        b / "ct", 2, seed=14, matrix=32,
        patient=SamplePatient("Müller^Jürgen", "DE-77", "19600229", "M", "066Y"),
        site=SampleSite("Klinik Nord", "KN-CT1", "Gérard^Ève", "DE"),
        study_description="Thorax nativ",
    )  # fmt: skip
    _edit(
        muller, charset="ISO_IR 100", StudyDate="20261120", StudyTime="221500",
        SeriesDescription="Thorax axial",
    )  # fmt: skip
    assert b"M\xfcller" in muller[0].read_bytes()
    s.studies["muller-ct"] = ("tram-b", muller)
    return s


@dataclass
class World:
    hub: InProcessHub
    samples: Samples
    tokens: dict[str, str]

    def client(self, user: str = "root") -> DICOMwebClient:
        return DICOMwebClient(
            url=self.hub.url + "/dicom-web",
            headers={"Authorization": "Bearer " + self.tokens[user]},
        )

    def get(
        self, path: str, user: str = "root", headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        headers = dict(headers or {})
        if user:
            headers["Authorization"] = "Bearer " + self.tokens[user]
        return httpx.get(self.hub.url + "/dicom-web" + path, headers=headers, timeout=30, **kw)


def _sign_in(hub: InProcessHub, username: str) -> str:
    answer = httpx.post(
        f"{hub.url}/api/auth/token", data={"username": username, "password": PASSWORD}
    )
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    return make_samples(tmp_path_factory.mktemp("samples"))


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", marks=pytest.mark.needs_dcmtk),
        pytest.param("postgresql", marks=[pytest.mark.needs_dcmtk, pytest.mark.needs_postgres]),
    ],
)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, samples: Samples
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"qido-{request.param}")
    roster = tmp / "roster.yaml"
    roster.write_text(ROSTER)
    with _database(request.param) as url:
        hub_kw: dict[str, Any] = {"roster_file": roster}
        if url:
            hub_kw["database_url"] = url
        with InProcessHub(tmp / "hub", **hub_kw) as hub:
            gateways = []
            for station in ("tram-a", "tram-b"):
                token = hub.hub.ingest.rotate_token(station)  # the roster created it
                gateways.append(
                    InProcessGateway(tmp / f"gw-{station}", hub_url=hub.url, token=token)
                )
            with gateways[0] as gw_a, gateways[1] as gw_b:
                for gw, folder in ((gw_a, "tram-a"), (gw_b, "tram-b")):
                    res = storescu([samples.root / folder], "127.0.0.1", gw.port, gw.aet, "MOD")
                    assert res.returncode == 0, res.stderr[-3000:]
                expected = {samples.uid(k): len(f) for k, (_, f) in samples.studies.items()}
                wait_until(
                    lambda: hub.committed() == expected, 120, "4 studies committed", poll_s=0.25
                )
            accounts = hub.hub.app.state.accounts
            accounts.add_user("root", "admin", PASSWORD)
            accounts.add_user("nurse-a", "clinic", PASSWORD, station="tram-a")
            accounts.add_user("nurse-b", "clinic", PASSWORD, station="tram-b")
            accounts.add_user("kh", "radiologist", PASSWORD, radiologist="dr.kh")
            tokens = {u: _sign_in(hub, u) for u in ("root", "nurse-a", "nurse-b", "kh")}
            yield World(hub, samples, tokens)


class _database:
    """SQLite (None: the hub's default file) or a throw-away PostgreSQL database."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pg: PostgresCluster | None = None

    def __enter__(self) -> str | None:
        if self.kind == "sqlite":
            return None
        self.pg = PostgresCluster().start()
        return self.pg.create_database("qido")

    def __exit__(self, *exc: object) -> None:
        if self.pg is not None:
            self.pg.stop()


@pytest.fixture(scope="module")
def orthanc(samples: Samples) -> Iterator[OrthancServer]:
    server = OrthancServer(
        plugins=["dicomweb"], extra_config={"DefaultEncoding": "Utf8"}, graceful_stop=False
    )
    with server, server.client() as rest:
        for path in samples.files():
            assert rest.post("/instances", content=path.read_bytes()).status_code == 200
        yield server


def orthanc_qido(server: OrthancServer, path: str, params: dict[str, str]) -> Any:
    """A QIDO request with the values literal in the URL: Orthanc 1.10 does not decode."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=30)
    try:
        conn.request("GET", f"/dicom-web{path}" + (f"?{query}" if query else ""))
        answer = conn.getresponse()
        body = answer.read()
    finally:
        conn.close()
    assert answer.status == 200, (path, params, answer.status, body[:300])
    return json.loads(body)


# -- the same answers as Orthanc --------------------------------------------------------------

STUDY_QUERIES: list[dict[str, str]] = [
    {},
    {"PatientName": "nguy*"},
    {"PatientName": "DOE*"},
    {"PatientName": "*JOHN*"},
    {"PatientName": "doe^john"},
    {"PatientName": "D?E^JOHN"},
    {"PatientName": "*^J*"},
    {"PatientID": "US-0042"},
    {"PatientID": "VN*"},
    {"00100020": "VN-0005555"},
    {"StudyDescription": "CT*", "includefield": "StudyDescription"},
    {"StudyDescription": "*chest*", "includefield": "00081030"},
    {"ReferringPhysicianName": "smith*"},
    {"StudyDate": "20261121"},
    {"StudyDate": "20261101-"},
    {"StudyDate": "-20251231"},
    {"StudyDate": "20261001-20261120"},
    {"StudyTime": "080000-100000"},
    {"StudyDate": "20261001-", "StudyTime": "220000-"},
    {"ModalitiesInStudy": "CT"},
    {"ModalitiesInStudy": "CR"},
    {"ModalitiesInStudy": "CT,MR"},
    {"ModalitiesInStudy": "MR"},
    {"PatientSex": "F"},
    {"PatientBirthDate": "19600101-19691231"},
    {"StudyID": "42"},
    {"includefield": "00081030,00100030"},
]


def _comparable(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != _URL_TAG}


def _same(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str) -> None:
    """Same matches; same values for every attribute both return."""
    mine = {i[key]["Value"][0]: _comparable(i) for i in ours}
    other = {i[key]["Value"][0]: _comparable(i) for i in theirs}
    assert sorted(mine) == sorted(other)
    for uid, item in mine.items():
        common = set(item) & set(other[uid])
        assert {"0020000D", key} <= common
        assert {t: item[t] for t in common} == {t: other[uid][t] for t in common}, uid


def _hub_params(params: dict[str, str]) -> tuple[dict[str, str], list[str] | None]:
    filters = {k: v for k, v in params.items() if k != "includefield"}
    fields = params["includefield"].split(",") if "includefield" in params else None
    return filters, fields


@pytest.mark.needs_orthanc("dicomweb")
@pytest.mark.parametrize(
    "params", STUDY_QUERIES, ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()) or "all"
)
def test_study_searches_match_orthanc(
    world: World, orthanc: OrthancServer, params: dict[str, str]
) -> None:
    filters, fields = _hub_params(params)
    ours = world.client().search_for_studies(search_filters=filters, fields=fields)
    theirs = orthanc_qido(orthanc, "/studies", params)
    _same(ours, theirs, "0020000D")
    if params and params != {"includefield": "00081030,00100030"}:
        assert len(ours) < 4, "a filter that filters nothing proves nothing"


@pytest.mark.needs_orthanc("dicomweb")
def test_series_and_instance_searches_match_orthanc(world: World, orthanc: OrthancServer) -> None:
    s = world.samples
    ct = s.uid("vn-ct")
    series = sorted({_uid(p, "SeriesInstanceUID") for p in s.studies["vn-ct"][1]})
    client = world.client()
    cases: list[tuple[str, dict[str, str], Any]] = [
        (f"/studies/{ct}/series", {}, lambda f: client.search_for_series(ct, search_filters=f)),
        (f"/studies/{ct}/series", {"Modality": "CT"},
         lambda f: client.search_for_series(ct, search_filters=f)),
        (f"/studies/{ct}/series", {"SeriesNumber": "3"},
         lambda f: client.search_for_series(ct, search_filters=f)),
        (f"/studies/{ct}/series", {"SeriesInstanceUID": series[0]},
         lambda f: client.search_for_series(ct, search_filters=f)),
        ("/series", {"Modality": "CR"}, lambda f: client.search_for_series(search_filters=f)),
        ("/series", {"PatientID": "US-0042"},
         lambda f: client.search_for_series(search_filters=f)),
        ("/series", {"SeriesDescription": "thorax*"},
         lambda f: client.search_for_series(search_filters=f)),
    ]  # fmt: skip
    for path, params, ask in cases:
        ours = ask(params)
        _same(ours, orthanc_qido(orthanc, path, params), "0020000E")
        assert ours, (path, params)
    assert [i["00200011"]["Value"][0] for i in client.search_for_series(ct)] == [2, 3]

    for se in series:
        ours = client.search_for_instances(ct, se)
        _same(ours, orthanc_qido(orthanc, f"/studies/{ct}/series/{se}/instances", {}), "00080018")
        numbers = [i["00200013"]["Value"][0] for i in ours]
        assert numbers == sorted(numbers) and len(numbers) in (2, 3)
    sop = _uid(s.studies["vn-ct"][1][1], "SOPInstanceUID")
    inst_cases: list[tuple[str, dict[str, str], Any]] = [
        (f"/studies/{ct}/series/{series[0]}/instances", {"InstanceNumber": "2"},
         lambda f: client.search_for_instances(ct, series[0], search_filters=f)),
        (f"/studies/{ct}/instances", {},
         lambda f: client.search_for_instances(ct, search_filters=f)),
        (f"/studies/{ct}/instances", {"SOPInstanceUID": sop},
         lambda f: client.search_for_instances(ct, search_filters=f)),
        ("/instances", {"SOPClassUID": CR_CLASS},
         lambda f: client.search_for_instances(search_filters=f)),
        ("/instances", {"Modality": "CR"}, lambda f: client.search_for_instances(search_filters=f)),
    ]  # fmt: skip
    for path, params, ask in inst_cases:
        ours = ask(params)
        _same(ours, orthanc_qido(orthanc, path, params), "00080018")
        assert ours, (path, params)
    one = client.search_for_instances(ct, series[0])[0]
    assert {"00080016", "00080018", "00200013", "00280010", "00280011", "00280008"} <= set(one)
    assert one["00280010"] == {"vr": "US", "Value": [32]}


def test_answers_carry_what_ohif_reads(world: World) -> None:
    s = world.samples
    answer = world.get(
        "/studies",
        params={
            "limit": "101", "offset": "0", "fuzzymatching": "false",
            "includefield": "00081030,00080060,00080090,00100030",
        },
    )  # fmt: skip
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/dicom+json")
    assert answer.headers["cache-control"] == "no-store"  # patient data: never kept
    assert "00080060" in answer.headers["warning"]  # not a study attribute: said, not refused
    studies = answer.json()
    assert [i["0020000D"]["Value"][0] for i in studies] == [
        s.uid("vn-ct"),
        s.uid("muller-ct"),
        s.uid("doe-cr"),
        s.uid("tran-cr"),
    ]  # StudyDate, StudyTime descending
    need = "0020000D 00080020 00080030 00080050 00100010 00100020 00100030 00100040 00201208 "
    need += "00201206 00081030 00080061 00080090 00081190"
    vn = studies[0]
    assert set(need.split()) <= set(vn)
    assert vn["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Nguyễn^Thị Hồng"}]}
    assert vn["00201206"]["Value"] == [2] and vn["00201208"]["Value"] == [5]
    assert vn["00081190"]["Value"] == [f"{world.hub.url}/dicom-web/studies/{s.uid('vn-ct')}"]
    assert studies[1]["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]  # Latin-1
    assert studies[1]["00080090"]["Value"] == [{"Alphabetic": "Gérard^Ève"}]
    # Vietnamese in the query, percent-encoded (OHIF, dicomweb-client): matched as Unicode.
    client = world.client()
    for name in ("*Hồng", "nguyễn^thị*", "TRẦN*", "*bình"):
        found = client.search_for_studies(search_filters={"PatientName": name})
        assert len(found) == 1, name
    assert client.search_for_studies(search_filters={"StudyDescription": "*NGỰC*"})
    # + is a space (dicomweb-client sends spaces so)
    assert len(client.search_for_studies(search_filters={"StudyDescription": "CT ngực*"})) == 1
    # pages over a stable order; the Warning says when more could be had
    page = world.get("/studies", params={"limit": "2", "offset": "1"})
    assert [i["0020000D"]["Value"][0] for i in page.json()] == [s.uid("muller-ct"), s.uid("doe-cr")]
    assert "additional results" in page.headers["warning"]
    assert "warning" not in world.get("/studies", params={"limit": "4"}).headers
    fuzzy = world.get("/studies", params={"fuzzymatching": "true", "PatientName": "DOE*"})
    assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["warning"]
    lists = world.get("/studies", params={"ModalitiesInStudy": "CT\\CR"}).json()
    assert len(lists) == 4
    series = client.search_for_series(s.uid("vn-ct"))
    assert {"0020000D", "0020000E", "00080060", "00200011", "0008103E", "00201209",
            "00080021", "00080031"} <= set(series[0])  # fmt: skip
    assert series[0]["00201209"]["Value"] == [3]


@pytest.mark.needs_orthanc("dicomweb")
def test_where_the_hub_and_orthanc_differ(world: World, orthanc: OrthancServer) -> None:
    s = world.samples
    client = world.client()

    def both(params: dict[str, str]) -> tuple[int, int]:
        ours = world.get("/studies", params=params)
        theirs = orthanc_qido(orthanc, "/studies", params)
        return (len(ours.json()) if ours.status_code == 200 else ours.status_code), len(theirs)

    assert both({"StudyDate": "2026-11-21"}) == (1, 0)  # ISO dates: tolerated at the hub only
    assert both({"ModalitiesInStudy": "CT\\CR"}) == (4, 0)  # backslash lists
    assert both({"PatientID": "us-0042"}) == (0, 1)  # identifiers: exact case at the hub
    assert both({"PatientName": "Nguy?n*"}) == (1, 0)  # ? is a character, at Orthanc a byte
    assert both({"Foo": "bar"}) == (400, 4)  # unknown parameters
    encoded = orthanc_qido(orthanc, "/studies", {"PatientName": "*H%E1%BB%93ng"})
    assert (
        encoded == []
        and len(client.search_for_studies(search_filters={"PatientName": "*Hồng"})) == 1
    )
    missing = "2.25.1234567890"
    assert orthanc_qido(orthanc, f"/studies/{missing}/series", {}) == []
    assert world.get(f"/studies/{missing}/series").status_code == 404
    plain = {i["0020000D"]["Value"][0]: i for i in orthanc_qido(orthanc, "/studies", {})}
    assert "00081030" not in plain[s.uid("vn-ct")]
    assert "00081030" in client.search_for_studies(search_filters={"PatientID": "VN-0001234"})[0]


# -- who sees what, audited -------------------------------------------------------------------


def _studies(world: World, user: str, **params: str) -> list[str]:
    answer = world.get("/studies", user=user, params=params)
    assert answer.status_code == 200, answer.text
    return [i["0020000D"]["Value"][0] for i in answer.json()]


def test_each_caller_sees_what_the_access_rule_says_and_every_read_is_audited(
    world: World,
) -> None:
    s = world.samples
    audit = world.hub.hub.app.state.audit
    audit.flush()
    seen_before = len(audit.query(event_type="study.search", limit=1000))
    a_uids = {s.uid("vn-ct"), s.uid("doe-cr")}
    b_uids = {s.uid("tran-cr"), s.uid("muller-ct")}
    assert set(_studies(world, "root")) == a_uids | b_uids
    assert set(_studies(world, "nurse-a")) == a_uids
    assert set(_studies(world, "nurse-b")) == b_uids
    assert _studies(world, "kh") == []  # a radiologist licensed elsewhere sees nothing
    # the limit pages over what the caller may see, not over everything
    assert len(_studies(world, "nurse-a", limit="2")) == 2
    assert len(_studies(world, "nurse-a", limit="1", offset="1")) == 1

    # "not yours" answers exactly like "not there", at every scoped level
    random_uid = "2.25.98765432109876543210"
    for user, uid in (("kh", s.uid("vn-ct")), ("nurse-b", s.uid("vn-ct")), ("nurse-a", random_uid)):
        for path in (f"/studies/{uid}/series", f"/studies/{uid}/instances"):
            refused = world.get(path, user=user)
            missing = world.get(path.replace(uid, random_uid), user=user)
            assert refused.status_code == missing.status_code == 404
            assert refused.json() == missing.json()
    series = _uid(s.studies["vn-ct"][1][0], "SeriesInstanceUID")
    refused = world.get(f"/studies/{s.uid('vn-ct')}/series/{series}/instances", user="nurse-b")
    assert refused.status_code == 404
    ok = world.get(f"/studies/{s.uid('vn-ct')}/series/{series}/instances", user="nurse-a")
    assert ok.status_code == 200 and len(ok.json()) == 3
    wrong_series = world.get(f"/studies/{s.uid('vn-ct')}/series/{random_uid}/instances")
    assert wrong_series.status_code == 404
    # series and instances across studies filter the same way
    assert {
        i["0020000D"]["Value"][0] for i in world.get("/series", user="nurse-b").json()
    } == b_uids
    assert world.get("/instances", user="kh").json() == []
    assert world.get("/studies", user="").status_code == 401

    audit.flush()
    events = audit.query(event_type="study.search", limit=1000)[seen_before:]
    by_user: dict[str, list[Any]] = {}
    for e in events:
        by_user.setdefault(e.username, []).append(e)
    root_reads = {e.study_uid for e in by_user["root"] if e.outcome == 0}
    assert a_uids | b_uids <= root_reads
    assert {e.study_uid for e in by_user["nurse-a"] if e.outcome == 0} <= a_uids | {None}
    assert all(e.action == "Query" and e.action_code == "E" for e in events)
    kh = by_user["kh"]
    assert {e.study_uid for e in kh if e.outcome == 0} == {None}  # searched, nothing returned
    refusals = {(e.study_uid, e.outcome) for e in kh if e.outcome}
    assert (s.uid("vn-ct"), 8) in refusals  # exists, not theirs: a serious failure
    assert (random_uid, 4) in {(e.study_uid, e.outcome) for e in events if e.outcome}
    assert not any("Nguy" in e.detail or "DOE" in e.detail for e in events)


@pytest.mark.parametrize(
    "query",
    [
        "/studies?Foo=bar",
        "/studies?StudyDate=garbage",
        "/studies?StudyDate=20261301",
        "/studies?StudyTime=2500",
        "/studies?limit=-1",
        "/studies?offset=x",
        "/studies?StudyInstanceUID=1.2.*",
        "/studies?Modality=CT",
        "/studies?includefield=Bogus",
        "/studies?fuzzymatching=perhaps",
        "/studies?PatientName=A*&PatientName=B*",
        "/studies?patientname=DOE*",
        "/studies/not-a-uid/series",
        "/studies/1.2.3/series/1..2/instances",
        "/series?SOPInstanceUID=1.2.3",
        "/instances?InstanceNumber=one",
        "/studies?Nguy%E1%BB%85n=1",
    ],
)
def test_bad_queries_are_400_with_a_message_never_500(world: World, query: str) -> None:
    answer = httpx.get(
        world.hub.url + "/dicom-web" + query,
        headers={"Authorization": "Bearer " + world.tokens["root"]},
    )
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert detail and "Nguyễn" not in detail
    audit = world.hub.hub.app.state.audit
    audit.flush()
    last = audit.query(username="root", event_type="study.search", outcome=4, limit=1000)[-1]
    assert last.detail.startswith("QIDO-RS") and "refused" in last.detail


def test_not_acceptable(world: World) -> None:
    answer = world.get(
        "/studies", headers={"Accept": "multipart/related; type=application/dicom+xml"}
    )
    assert answer.status_code == 406


# -- committed only; reindex ---------------------------------------------------------------


@pytest.mark.needs_dcmtk
def test_only_committed_instances_are_shown_and_reindex_rebuilds_the_index(
    tmp_path: Path, samples: Samples
) -> None:
    roster = tmp_path / "roster.yaml"
    roster.write_text(ROSTER)
    with InProcessHub(tmp_path / "hub", roster_file=roster) as hub:
        hub.hub.app.state.accounts.add_user("root", "admin", PASSWORD)
        token = _sign_in(hub, "root")
        world = World(hub, samples, {"root": token})
        ingest = hub.hub.ingest
        station, files = samples.studies["vn-ct"]
        uid = samples.uid("vn-ct")
        first, rest = files[:3], files[3:]
        sops = [ingest.store_instance(station, p.read_bytes()) for p in first]
        # held, not committed: in flux, nothing shows
        assert world.get("/studies").json() == []
        assert world.get(f"/studies/{uid}/series").status_code == 404
        assert ingest.commit(station, uid, sops, StudyMeta()).committed
        (study,) = world.get("/studies").json()
        assert study["00201208"]["Value"] == [3] and study["00201206"]["Value"] == [1]
        # a follow-up arriving: not counted, not listed until its commit
        more = [ingest.store_instance(station, p.read_bytes()) for p in rest]
        assert world.get("/studies").json()[0]["00201208"]["Value"] == [3]
        assert len(world.get(f"/studies/{uid}/instances").json()) == 3
        assert ingest.commit(station, uid, sops + more, StudyMeta()).committed
        before = world.get(f"/studies/{uid}/instances").json()
        assert len(before) == 5 and world.get("/studies").json()[0]["00201206"]["Value"] == [2]

        # A hub from before the index: the rows are gone, the instances are not.
        with ingest.session.begin() as s:
            for table in (DicomInstanceIndex, DicomSeriesIndex, DicomStudyIndex):
                s.execute(delete(table))
        assert world.get("/studies").json() == []
        done = _reindex(hub.settings.data_dir)
        assert done.returncode == 0, done.stderr
        assert "5 instances indexed" in done.stdout, done.stdout
        assert world.get(f"/studies/{uid}/instances").json() == before
        again = _reindex(hub.settings.data_dir)
        assert again.returncode == 0 and "nothing to index" in again.stdout, again.stdout


def _reindex(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", "hub", "reindex", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
