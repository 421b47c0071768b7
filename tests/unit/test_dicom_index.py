"""The DICOM attribute index (reading_queue.intake.index): rows from real headers with tricky
values (character sets, multi-values, missing and malformed attributes), and the QIDO-RS
query parsing and matching rules, down to the SQL on SQLite."""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import insert, true
from sqlalchemy.orm import Session

from reading_queue.intake import index
from reading_queue.intake.index import Level, QueryError, parse_query
from reading_queue.models import HubInstance, make_engine
from telerad.core.identity import identity_of, read_header

STUDY = "1.2.826.0.1.3680043.10.543.1"
SERIES = STUDY + ".1"


def _file(charset: str | None = "ISO_IR 192", **attrs: Any) -> bytes:
    """A Part-10 header (no pixels) written by pydicom in ``charset``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = attrs.get("SOPInstanceUID", SERIES + ".1")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SERIES + ".1"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _entry(data: bytes) -> index.IndexEntry:
    header = read_header(data, decode=False)
    return index.entry_of(header, identity_of(header))


# -- rows from headers ----------------------------------------------------------------------


def test_vietnamese_utf8_names_are_stored_as_unicode_with_an_upper_case_key() -> None:
    data = _file(
        PatientName="Nguyễn^Thị Hồng",
        ReferringPhysicianName="Lê^Văn Tâm",
        StudyDescription="CT ngực không tiêm thuốc cản quang",
        SeriesDescription="Ngực trục ngang 2.5 mm",
        PatientID="VN-0001234",
    )
    assert "Nguyễn".encode() in data  # really UTF-8 in the file
    e = _entry(data)
    assert e.study["patient_name"] == "Nguyễn^Thị Hồng"
    assert e.study["patient_name_key"] == "NGUYỄN^THỊ HỒNG"
    assert e.study["referring_physician_key"] == "LÊ^VĂN TÂM"
    assert e.study["study_description_key"] == "CT NGỰC KHÔNG TIÊM THUỐC CẢN QUANG"
    assert e.series["series_description"] == "Ngực trục ngang 2.5 mm"
    assert e.study["patient_id"] == "VN-0001234"


def test_latin1_is_decoded_with_the_files_character_set() -> None:
    data = _file(
        "ISO_IR 100", PatientName="Müller^Jürgen", StudyDescription="Thorax p.a. Übersicht"
    )
    assert b"M\xfcller" in data and "Müller".encode() not in data
    e = _entry(data)
    assert e.study["patient_name"] == "Müller^Jürgen"
    assert e.study["patient_name_key"] == "MÜLLER^JÜRGEN"
    assert e.study["study_description"] == "Thorax p.a. Übersicht"


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrRuss.dcm", "chrX1.dcm", "chrGreek.dcm"])
def test_pydicom_character_set_samples(name: str) -> None:
    """ISO 2022 Japanese (three component groups), Cyrillic, UTF-8 Chinese, Greek."""
    (path,) = [p for p in get_charset_files(name)]
    expected = str(dcmread(path).PatientName)
    data = Path(path).read_bytes()
    header = read_header(data, decode=False)
    ident = index.Identity(
        sop_class_uid="1.2.3", sop_instance_uid="1.2.3.4", study_uid="1.2.3.5", series_uid="1.2.6"
    )
    e = index.entry_of(header, ident)
    assert e.study["patient_name"] == expected
    assert any(ord(c) > 127 for c in expected)
    assert e.study["patient_name_key"] == index.name_key(expected)


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
@pytest.mark.filterwarnings("ignore:The value length:UserWarning")
def test_missing_multi_valued_and_malformed_values_never_raise() -> None:
    data = _file(
        PatientName="DOE^JOHN^^^",
        PatientBirthDate="1968.03.14",  # ACR-NEMA style
        StudyDate="20261121",
        StudyTime="09:30:15",
        Modality="ct",
        SeriesNumber="2",
        InstanceNumber=["3", "4"],  # wrong VM: the first counts
        Rows=64,
        Columns=64,
        NumberOfFrames="12",
        StudyDescription="X" * 300,  # over LO's 64 and over the column: cut
        OtherPatientIDs=["A", "B"],
    )
    e = _entry(data)
    assert e.study["patient_name"] == "DOE^JOHN^^^"
    assert e.study["patient_name_key"] == "DOE^JOHN"
    assert e.study["patient_birth_date"] == "19680314"
    assert e.study["study_time"] == "093015"
    assert e.series["modality"] == "CT"
    assert e.series["series_number"] == 2
    assert e.instance == {
        "instance_number": 3,
        "rows": 64,
        "columns": 64,
        "number_of_frames": 12,
        "transfer_syntax_uid": ExplicitVRLittleEndian,
    }
    assert len(e.study["study_description"]) == 128
    bare = _entry(_file(None))
    assert bare.study["patient_name"] == "" and bare.study["study_date"] == ""
    assert bare.series["series_number"] is None and bare.instance["rows"] is None


def test_bytes_that_do_not_decode_are_replaced_not_refused() -> None:
    data = _file(PatientName="Nguyen^Van")
    broken = data.replace(b"Nguyen^Van", b"Ngu\xff\xfen^Van")  # not UTF-8
    with pytest.warns(UserWarning):
        e = _entry(broken)
    assert e.study["patient_name"].startswith("Ngu") and e.study["patient_name"].endswith("^Van")


def test_keys() -> None:
    assert index.name_key(" doe^john^^=ドウ^ジョン^= ") == "DOE^JOHN=ドウ^ジョン"
    composed, decomposed = "Nguyễn", "Nguye\u0302\u0303n"
    assert index.text_key(decomposed) == index.text_key(composed) == "NGUYỄN"


# -- query parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20261121", ("20261121", "20261121")),
        ("2026-11-21", ("20261121", "20261121")),
        ("20261121-", ("20261121", None)),
        ("-20261121", (None, "20261121")),
        ("20261101-20261130", ("20261101", "20261130")),
        ("2026-11-01-2026-11-30", ("20261101", "20261130")),
        ("2026-11-01-", ("20261101", None)),
    ],
)
def test_date_ranges(text: str, expected: tuple[str | None, str | None]) -> None:
    assert index.parse_date_range(text) == expected


@pytest.mark.parametrize(
    "text", ["-", "2026112", "20261321", "2026-02-30", "20261201-20261101", "yesterday", "2026*"]
)
def test_bad_dates(text: str) -> None:
    with pytest.raises(QueryError):
        index.parse_date_range(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("093015", ("093015", "093015")),
        ("0930", ("093000", "093059")),
        ("09", ("090000", "095959")),
        ("093015.123", ("093015", "093015")),
        ("090000-100000", ("090000", "100000")),
        ("0900-", ("090000", None)),
        ("-1000", (None, "100059")),
        ("09:00-10:00", ("090000", "100059")),
    ],
)
def test_time_ranges(text: str, expected: tuple[str | None, str | None]) -> None:
    assert index.parse_time_range(text) == expected


@pytest.mark.parametrize("text", ["25", "0960", "1000-0900", "9", "noon", "-"])
def test_bad_times(text: str) -> None:
    with pytest.raises(QueryError):
        index.parse_time_range(text)


def test_wildcards_become_escaped_like_and_glob_patterns() -> None:
    assert index.like_pattern("DOE*") == "DOE%"
    assert index.like_pattern("*JO?N*") == "%JO_N%"
    assert index.like_pattern("A_B%C\\D*") == "A\\_B\\%C\\\\D%"
    assert index.glob_pattern("A[1]*?") == "A[[]1]*?"


def test_uid_lists_and_universal_matching() -> None:
    uid = index.BY_KEYWORD["StudyInstanceUID"]
    c = index.parse_criterion(uid, "1.2.3,1.2.4\\1.2.5, 1.2.3")
    assert c is not None and c.values == ("1.2.3", "1.2.4", "1.2.5")
    for bad in ("1.2.*", "1..2", "abc", "1.2.3,x"):
        with pytest.raises(QueryError):
            index.parse_criterion(uid, bad)
    name = index.BY_KEYWORD["PatientName"]
    assert index.parse_criterion(name, "") is None
    assert index.parse_criterion(name, "*") is None
    c = index.parse_criterion(name, "doe*\\Nguyễn^Thị")
    assert c is not None and c.patterns == ("DOE*",) and c.values == ("NGUYỄN^THỊ",)
    mods = index.parse_criterion(index.BY_KEYWORD["ModalitiesInStudy"], "ct,mr\\CR")
    assert mods is not None and mods.values == ("CT", "MR", "CR")
    pid = index.parse_criterion(index.BY_KEYWORD["PatientID"], "vn-0001234")
    assert pid is not None and pid.values == ("vn-0001234",)  # identifiers: exact case
    with pytest.raises(QueryError):
        index.parse_criterion(index.BY_KEYWORD["SeriesNumber"], "two")


def test_parse_query_keywords_tags_limits_and_warnings() -> None:
    q = parse_query(
        Level.STUDY,
        [
            ("00100020", "VN-0001234"),
            ("StudyDate", "20261101-"),
            ("limit", "5000"),
            ("offset", "10"),
            ("fuzzymatching", "true"),
            ("includefield", "00081030,StudyID"),
            ("includefield", "IssuerOfPatientID"),
            ("includefield", "SliceThickness"),  # a DICOM attribute the index lacks
            ("includefield", "SOPInstanceUID"),  # below the study level
        ],
    )
    assert [c.attribute.keyword for c in q.criteria] == ["PatientID", "StudyDate"]
    assert q.limit == index.MAX_LIMIT and q.offset == 10 and q.fuzzy
    assert {"StudyDescription", "StudyID", "IssuerOfPatientID", "PatientID"} <= q.include
    text = " | ".join(q.warnings)
    assert "lowered" in text and "fuzzymatching" in text
    assert "SliceThickness" in text and "SOPInstanceUID" in text
    assert "00100021" in {a.tag for a in q.returned()}
    assert parse_query(Level.STUDY, [("limit", "0")]).limit == index.MAX_LIMIT
    everything = parse_query(Level.SERIES, [("includefield", "all")], study_uid="1.2.3")
    assert "PatientName" in {a.keyword for a in everything.returned()}


@pytest.mark.parametrize(
    ("level", "params"),
    [
        (Level.STUDY, [("Nguyễn Thị", "x")]),  # unknown parameter
        (Level.STUDY, [("patientname", "DOE*")]),  # keywords are case-sensitive
        (Level.STUDY, [("SliceThickness", "1")]),  # a real attribute, not searchable here
        (Level.STUDY, [("Modality", "CT")]),  # a series attribute at the study level
        (Level.SERIES, [("SOPInstanceUID", "1.2.3")]),
        (Level.STUDY, [("PatientName", "A*"), ("00100010", "B*")]),  # twice
        (Level.STUDY, [("limit", "-1")]),
        (Level.STUDY, [("limit", "ten")]),
        (Level.STUDY, [("offset", "1"), ("offset", "2")]),
        (Level.STUDY, [("fuzzymatching", "maybe")]),
        (Level.STUDY, [("includefield", "Bogus")]),
        (Level.STUDY, [("StudyDate", "Nguyễn")]),
        (Level.STUDY, [("PatientBirthDate", "19680231")]),
        (Level.INSTANCE, [("InstanceNumber", "1.5")]),
    ],
)
def test_bad_queries_are_query_errors_that_never_echo_values(
    level: Level, params: list[tuple[str, str]]
) -> None:
    with pytest.raises(QueryError) as caught:
        parse_query(level, params)
    assert "Nguyễn" not in str(caught.value)
    if params[0][0] == "Modality":
        assert "ModalitiesInStudy" in str(caught.value)


def test_path_uids_are_checked() -> None:
    with pytest.raises(QueryError):
        parse_query(Level.SERIES, [], study_uid="not-a-uid")
    with pytest.raises(QueryError):
        parse_query(Level.INSTANCE, [], study_uid="1.2.3", series_uid="1.2.x")


def test_returned_attributes_by_level() -> None:
    studies = {a.tag for a in parse_query(Level.STUDY, []).returned()}
    assert {
        "0020000D", "00080020", "00080030", "00080050", "00100010", "00100020", "00100030",
        "00100040", "00201208", "00201206", "00081030", "00080061", "00080090",
    } <= studies  # fmt: skip
    assert "00100021" not in studies  # IssuerOfPatientID: on request
    scoped = {a.tag for a in parse_query(Level.SERIES, [], study_uid="1.2.3").returned()}
    assert {"0020000D", "0020000E", "00080060", "00200011", "0008103E", "00201209"} <= scoped
    assert {"00080021", "00080031"} <= scoped and "00100010" not in scoped
    every_series = {
        a.tag for a in parse_query(Level.SERIES, [], returns_from=Level.STUDY).returned()
    }
    assert "00100010" in every_series
    asked = parse_query(Level.SERIES, [("includefield", "PatientName")], study_uid="1.2.3")
    assert "00100010" in {a.tag for a in asked.returned()}
    instances = {
        a.tag
        for a in parse_query(Level.INSTANCE, [], study_uid="1.2.3", series_uid="1.2.3.4").returned()
    }
    assert {"00080016", "00080018", "00200013", "00280010", "00280011", "00280008"} <= instances
    assert {"0020000D", "0020000E"} <= instances and "00080060" not in instances


# -- matching, in SQL (SQLite: GLOB for wildcards) -------------------------------------------


def _store(s: Session, n: int, study: str, state: str = "committed", **attrs: Any) -> None:
    series = f"{study}.1"
    data = _file(
        SOPInstanceUID=f"{series}.{n}", StudyInstanceUID=study, SeriesInstanceUID=series, **attrs
    )
    header = read_header(data, decode=False)
    ident = identity_of(header)
    s.execute(
        insert(HubInstance).values(
            sop_instance_uid=ident.sop_instance_uid, study_uid=study, series_uid=series,
            sop_class_uid=CTImageStorage, sha256="0" * 64, size=len(data), station="s",
            archive_ref="x", state=state, received_at=time.time(),
        )
    )  # fmt: skip
    index.record(s, [index.entry_of(header, ident)])


def test_matching_in_sql(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite3'}")
    with Session(engine) as s, s.begin():
        _store(s, 1, "1.2.1", PatientName="DOE^JOHN", StudyDate="20261121", Modality="CT",
               StudyTime="093015", PatientID="VN-1", InstanceNumber=2)  # fmt: skip
        _store(s, 2, "1.2.1", PatientName="DOE^JOHN", StudyDate="20261121", Modality="CT",
               InstanceNumber=1)  # fmt: skip
        _store(s, 1, "1.2.2", PatientName="Nguyễn^Thị Hồng", StudyDate="20261001", Modality="CR",
               StudyTime="141205", PatientID="vn-1", StudyDescription="XQ ngực")  # fmt: skip
        _store(s, 1, "1.2.3", PatientName="SMITH^JOHNNY", StudyDate="20250101", Modality="MR")
        _store(s, 1, "1.2.4", state="received", PatientName="DOE^JANE", Modality="CT")
        index.refresh_studies(s, ["1.2.1", "1.2.2", "1.2.3", "1.2.4"])

    def studies(**params: str) -> list[str]:
        q = parse_query(Level.STUDY, list(params.items()))
        with engine.connect() as conn:
            return [r["StudyInstanceUID"] for r in index.search(conn, q, lambda _c: true()).rows]

    assert studies() == ["1.2.1", "1.2.2", "1.2.3"]  # StudyDate descending; 1.2.4 uncommitted
    assert studies(PatientName="doe*") == ["1.2.1"]
    assert studies(PatientName="*JOHN*") == ["1.2.1", "1.2.3"]
    assert studies(PatientName="*john") == ["1.2.1"]
    assert studies(PatientName="nguyễn*") == ["1.2.2"]
    assert studies(PatientName="Nguy?n*") == ["1.2.2"]  # ? is one character, not one byte
    assert studies(PatientName="NGUYEN*") == []  # accents are not folded (as Orthanc)
    assert studies(PatientName="DOE^JOHN") == ["1.2.1"]
    assert studies(PatientName="DOE") == []  # no wildcard: the whole name
    assert studies(PatientID="VN-1") == ["1.2.1"]  # identifiers: exact, case-sensitive
    assert studies(PatientID="vn*") == ["1.2.2"]
    assert studies(StudyDescription="*NGỰC*") == ["1.2.2"]
    assert studies(StudyDate="20261001-") == ["1.2.1", "1.2.2"]
    assert studies(StudyDate="-2025-12-31") == ["1.2.3"]
    assert studies(StudyTime="0900-1000") == ["1.2.1"]
    assert studies(ModalitiesInStudy="CT,CR") == ["1.2.1", "1.2.2"]
    assert studies(ModalitiesInStudy="mr") == ["1.2.3"]
    assert studies(StudyInstanceUID="1.2.3\\1.2.2\\1.2.4") == ["1.2.2", "1.2.3"]
    assert studies(limit="1", offset="1") == ["1.2.2"]

    q = parse_query(Level.INSTANCE, [], study_uid="1.2.1", series_uid="1.2.1.1")
    with engine.connect() as conn:
        rows = index.search(conn, q, lambda _c: true()).rows
        first = index.search(conn, parse_query(Level.STUDY, [("limit", "1")]), lambda _c: true())
    assert [r["InstanceNumber"] for r in rows] == [1, 2]
    assert first.more and len(first.rows) == 1
    assert first.rows[0]["NumberOfStudyRelatedInstances"] == 2
    assert first.rows[0]["ModalitiesInStudy"] == "CT"
