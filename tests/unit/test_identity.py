"""DICOM identity: one rule for UIDs at the gateway, the hub and export."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_gateway.durable.recovery import recover
from dicom_gateway.durable.scp import (
    CANNOT_UNDERSTAND,
    INVALID_UID,
    MISSING_UIDS,
    SUCCESS,
    UID_MISMATCH,
    Listener,
    encode_file_meta,
)
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import StateDB
from dicom_gateway.station.service import gateway_status
from dicom_gateway.station.settings import GatewaySettings
from telerad.core.identity import (
    IdentityError,
    UndecodableError,
    identity_of,
    read_header,
    read_identity,
    safe_uid,
    uid_problem,
)

LONG_UID = "1.2.840." + "1234567890." * 6 + "1"  # 75 characters, as some modalities send


def _ct(**tags: object) -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _with_bad_vr(data: bytes, group: int, element: int) -> bytes:
    """Overwrite one element's VR with ``ZZ`` (explicit VR little endian)."""
    at = data.index(struct.pack("<HH", group, element), 132 + 12)
    return data[: at + 4] + b"ZZ" + data[at + 6 :]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("1.2.840.10008.1.2", None),
        ("1.2.03.4", None),  # leading zeros: non-conformant, tolerated (real modalities)
        ("", "empty"),
        (LONG_UID, "75 characters long (at most 64)"),
        ("1.2.abc", "contains characters other than digits and dots"),
        ("1.2.\u0663", "contains characters other than digits and dots"),  # Arabic-Indic 3
        ("../../etc", "contains characters other than digits and dots"),
        ("1..2", "has an empty component"),
        (".1.2", "has an empty component"),
        ("1.2.", "has an empty component"),
        (None, "not text"),
    ],
)
def test_uid_rule(value: object, problem: str | None) -> None:
    assert uid_problem(value) == problem
    if problem is None:
        assert isinstance(value, str) and safe_uid(value) == value
    elif isinstance(value, str):
        with pytest.raises(ValueError, match="not a usable UID"):
            safe_uid(value)


def test_identity_names_the_unusable_field() -> None:
    ds, ident = read_identity(_ct(BodyPartExamined="CHEST"))
    assert ident.modality == "CT" and ident.body_part == "CHEST"
    assert ident.sop_instance_uid == str(ds.SOPInstanceUID)
    assert ident.transfer_syntax == str(ds.file_meta.TransferSyntaxUID)

    ds.SeriesInstanceUID = LONG_UID
    with pytest.raises(IdentityError) as err:
        identity_of(ds)
    assert err.value.field == "SeriesInstanceUID" and not err.value.missing
    assert "75 characters" in err.value.reason
    assert err.value.sop_instance_uid == str(ds.SOPInstanceUID)  # listed in the quarantine

    del ds.StudyInstanceUID
    with pytest.raises(IdentityError) as err:
        identity_of(ds)
    assert err.value.field == "StudyInstanceUID" and err.value.missing


def test_header_with_an_unknown_vr_is_undecodable_not_a_crash() -> None:
    bad = _with_bad_vr(_ct(), 0x0008, 0x0060)  # Modality
    with pytest.raises(UndecodableError, match="Unknown Value Representation"):
        read_header(bad)
    with pytest.raises((UndecodableError, IdentityError)):
        read_identity(b"\x00" * 128 + b"DICM" + b"\xff" * 40)


def test_header_beyond_the_probe_is_still_read() -> None:
    ds = dcmread(BytesIO(_ct()))
    block = ds.private_block(0x0019, "TELERAD TEST", create=True)
    block.add_new(0x01, "OB", b"\x00" * 300_000)  # a header longer than the 256 KiB probe
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    header, ident = read_identity(buf.getvalue())
    assert ident.sop_instance_uid == str(ds.SOPInstanceUID)
    assert "PixelData" not in header and len(header[block.get_tag(0x01)].value) == 300_000


# -- the listener refuses at receive time what the hub would refuse --------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Listener:
    settings = GatewaySettings(data_dir=tmp_path, disk_reserve_mb=1)
    spool = Spool(tmp_path)
    state = StateDB(tmp_path / "gateway.sqlite3")
    return Listener(settings, spool, state, ["hub"])


def _quarantined(listener: Listener) -> list[dict[str, object]]:
    return [
        dict(r)
        for r in listener.state.query("SELECT status, reason, sop_instance_uid FROM quarantine")
    ]


def test_non_conformant_uid_is_quarantined_with_its_reason(listener: Listener) -> None:
    data = _ct(SeriesInstanceUID=LONG_UID)
    outcome = listener.store(data, calling_aet="CT01")
    assert outcome.status == INVALID_UID
    assert "SeriesInstanceUID is not a valid UID" in outcome.reason
    assert listener.state.scalar("SELECT count(*) FROM instances") == 0  # never forwarded
    [row] = _quarantined(listener)
    assert row["status"] == INVALID_UID and "75 characters" in str(row["reason"])
    assert gateway_status(listener.state, 60)["quarantined"] == 1


def test_uid_corrupted_into_non_ascii_is_quarantined(listener: Listener) -> None:
    data = _ct(StudyInstanceUID="1.2.3.\u00e94")
    outcome = listener.store(data, calling_aet="CT01")
    assert outcome.status == INVALID_UID and "StudyInstanceUID" in outcome.reason
    assert listener.state.scalar("SELECT count(*) FROM studies") == 0


def test_missing_uid_and_undecodable_dataset(listener: Listener) -> None:
    ds = dcmread(BytesIO(_ct()))
    del ds.SeriesInstanceUID
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert listener.store(buf.getvalue(), calling_aet="CT01").status == MISSING_UIDS
    outcome = listener.store(_with_bad_vr(_ct(), 0x0008, 0x0060), calling_aet="CT01")
    assert outcome.status == CANNOT_UNDERSTAND and "undecodable dataset" in outcome.reason
    assert [r["status"] for r in _quarantined(listener)] == [MISSING_UIDS, CANNOT_UNDERSTAND]


def test_command_and_dataset_must_agree(listener: Listener) -> None:
    data = _ct()
    ds = dcmread(BytesIO(data))
    wrong_class = listener.store(
        data,
        calling_aet="CT01",
        command_sop_uid=str(ds.SOPInstanceUID),
        command_sop_class="1.2.840.10008.5.1.4.1.1.1",  # CR, the dataset is CT
    )
    assert wrong_class.status == UID_MISMATCH and "SOP Class UID" in wrong_class.reason
    wrong_instance = listener.store(
        data, calling_aet="CT01", command_sop_uid="1.2.3", command_sop_class=str(ds.SOPClassUID)
    )
    assert wrong_instance.status == UID_MISMATCH and "SOP Instance UID" in wrong_instance.reason
    right = listener.store(
        data,
        calling_aet="CT01",
        command_sop_uid=str(ds.SOPInstanceUID),
        command_sop_class=str(ds.SOPClassUID),
    )
    assert right.status == SUCCESS


def test_recovery_keeps_the_calling_ae_for_priority_rules(tmp_path: Path) -> None:
    """A power cut can roll back the row; the spool file's file meta keeps the calling AE,
    so a rule on ``calling_aet`` still makes the re-indexed study STAT."""
    from dicom_gateway.durable.priority_rules import PriorityRule

    settings = GatewaySettings(
        data_dir=tmp_path,
        disk_reserve_mb=1,
        priority_rules=[PriorityRule(match={"calling_aet": "ER_CT"}, priority="stat")],
    )
    spool = Spool(tmp_path)
    state = StateDB(tmp_path / "gateway.sqlite3")
    full = _ct()
    ds = dcmread(BytesIO(full))
    body = full[132 + 4 + 8 + int.from_bytes(full[140:144], "little") :]
    prefix = encode_file_meta(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), "ER_CT"
    )
    spool.store(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), prefix + body)
    assert recover(spool, state, settings, ["hub"])["reindexed"] == 1
    rec = state.get_instance(str(ds.SOPInstanceUID))
    assert rec is not None and rec.calling_aet == "ER_CT"
    assert state.scalar("SELECT priority FROM studies") == 0  # STAT


# -- the hub: unpack, DICOM inbox and export ----------------------------------------------


def test_hub_refuses_unusable_headers_and_exports_only_inside_out_dir(tmp_path: Path) -> None:
    from sqlalchemy import update

    from reading_queue.intake.service import InstanceRefused, StudyMeta, open_ingest
    from reading_queue.models import HubInstance
    from reading_queue.settings import HubSettings

    ingest = open_ingest(HubSettings(data_dir=tmp_path / "hub"))
    with pytest.raises(InstanceRefused, match="SeriesInstanceUID is not a valid UID"):
        ingest.store_instance("dicom:CT01", _ct(SeriesInstanceUID=LONG_UID))
    data = _ct()
    ds = dcmread(BytesIO(data))
    sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    assert ingest.store_instance("dicom:CT01", data) == sop
    other = bytearray(data)
    other[-1] ^= 0xFF  # same UIDs, other pixels
    with pytest.raises(InstanceRefused, match="different content"):
        ingest.store_instance("dicom:CT01", bytes(other))
    assert ingest.commit("dicom:CT01", study, [sop], StudyMeta()).committed
    # Rows written before UIDs were checked (or by a bug) must still not steer export.
    with ingest.session.begin() as s:
        s.execute(
            update(HubInstance)
            .where(HubInstance.sop_instance_uid == sop)
            .values(series_uid="../../../escaped")
        )
    out = tmp_path / "out"
    seen: list[int] = []
    assert ingest.export(study, out, progress=seen.append) == 1
    assert seen == [1]
    [written] = [p for p in out.rglob("*.dcm")]
    assert written.resolve().is_relative_to(out.resolve())
    assert written.parent.name.startswith("uid-") and written.read_bytes() == data
    assert not (tmp_path / "escaped").exists()


def test_hub_commit_names_instances_that_could_not_be_delivered(tmp_path: Path) -> None:
    from reading_queue.intake.service import StudyMeta, open_ingest
    from reading_queue.settings import HubSettings

    ingest = open_ingest(HubSettings(data_dir=tmp_path / "hub"))
    data = _ct()
    ds = dcmread(BytesIO(data))
    sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    ingest.store_instance("dicom:CT01", data)
    res = ingest.commit(
        "dicom:CT01", study, [sop], StudyMeta(), [("1.2.3.4", "different content held")]
    )
    assert res.committed
    [hub_study] = [s for s in ingest.studies() if s.study_uid == study]
    assert hub_study.missing_instances == 1
    assert "different content held" in hub_study.missing_reason
