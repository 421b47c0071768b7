"""Bad input at the DICOM listener: clear statuses, quarantine, and nobody else disturbed."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_gateway.durable.scp import (
    CANNOT_UNDERSTAND,
    CONFLICT,
    MISSING_UIDS,
    OUT_OF_RESOURCES,
    UID_MISMATCH,
)
from tests.support.peers import echoscu
from tests.support.telerad_procs import InProcessGateway


def _ct() -> Dataset:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[InProcessGateway]:
    with InProcessGateway(tmp_path / "gw", allowed_callers=["MODALITY", "CT01@127.0.0.1"]) as gw:
        yield gw


def _associate(gw: InProcessGateway, calling: str = "MODALITY") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", gw.port, ae_title=gw.aet)


def test_unknown_calling_aet_rejected(gateway: InProcessGateway) -> None:
    assoc = _associate(gateway, "STRANGER")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    ok = _associate(gateway, "MODALITY")
    assert ok.is_established  # type: ignore[attr-defined]
    ok.release()  # type: ignore[attr-defined]
    by_host = _associate(gateway, "CT01")  # allowed from 127.0.0.1 only, and we are there
    assert by_host.is_established  # type: ignore[attr-defined]
    by_host.release()  # type: ignore[attr-defined]


def test_host_restricted_caller_from_elsewhere_rejected(tmp_path: Path) -> None:
    with InProcessGateway(tmp_path / "gw", allowed_callers=["CT01@10.1.2.3"]) as gw:
        assert _associate(gw, "CT01").is_rejected  # type: ignore[attr-defined]


@pytest.mark.needs_dcmtk
def test_echo_with_dcmtk(gateway: InProcessGateway) -> None:
    res = echoscu("127.0.0.1", gateway.port, gateway.aet, "MODALITY")
    assert res.returncode == 0, res.stderr


def test_malformed_pdus_do_not_disturb_other_associations(gateway: InProcessGateway) -> None:
    assoc = _associate(gateway)
    assert assoc.is_established  # type: ignore[attr-defined]
    # Garbage, a truncated A-ASSOCIATE-RQ and an absurd PDU length on raw sockets.
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x01\x00\x00\x00\x00\xff\x00\x01",
        b"\x04\x00\x7f\xff\xff\xff" + b"\x00" * 64,
        bytes(range(256)) * 8,
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            try:
                sock.recv(1024)
            except OSError:
                pass
    ds = _ct()
    status = assoc.send_c_store(ds)  # type: ignore[attr-defined]
    assert status.Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    fresh = _associate(gateway)
    assert fresh.is_established  # type: ignore[attr-defined]
    fresh.release()  # type: ignore[attr-defined]
    assert gateway.state.get_instance(str(ds.SOPInstanceUID)) is not None


def _send_raw_file(gw: InProcessGateway, path: Path) -> int:
    """Send a file's dataset bytes as they are (no pydicom re-encoding on our side)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = _associate(gw)
        try:
            rsp = assoc.send_c_store(path)  # type: ignore[attr-defined]
            return int(rsp.Status)
        finally:
            assoc.release()  # type: ignore[attr-defined]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _file_with_body(tmp: Path, ds: Dataset, body: bytes) -> Path:
    """A Part-10 file whose file meta is valid but whose dataset is ``body``."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta_len = int(
        dcmread(BytesIO(raw), stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    )
    path = tmp / f"{generate_uid()}.dcm"
    path.write_bytes(raw[: 128 + 4 + 12 + meta_len] + body)
    return path


def test_unparseable_dataset_is_quarantined(gateway: InProcessGateway, tmp_path: Path) -> None:
    ds = _ct()
    # A sequence of undefined length whose only item is cut short: no parser can read it.
    garbage = (
        b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
        + b"\x08\x00\x16\x00SQ\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\x10\x00\x00\x00"
        + b"\x00" * 8
    )
    status = _send_raw_file(gateway, _file_with_body(tmp_path, ds, garbage))
    assert status == CANNOT_UNDERSTAND
    rows = gateway.state.query("SELECT status, reason, path FROM quarantine")
    assert [r[0] for r in rows] == [CANNOT_UNDERSTAND]
    assert (gateway.settings.data_dir / rows[0][2]).read_bytes().endswith(garbage)
    # The association and the listener still work.
    assoc = _associate(gateway)
    assert assoc.send_c_store(_ct()).Status == 0  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]


def test_missing_uids_are_quarantined(gateway: InProcessGateway) -> None:
    ds = _ct()
    del ds.StudyInstanceUID
    assoc = _associate(gateway)
    assert assoc.send_c_store(ds).Status == MISSING_UIDS  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    reasons = [r[0] for r in gateway.state.query("SELECT reason FROM quarantine")]
    assert reasons == ["StudyInstanceUID is missing"]
    assert gateway.state.get_instance(str(ds.SOPInstanceUID)) is None


def test_identical_resend_is_idempotent_and_conflict_is_quarantined(
    gateway: InProcessGateway,
) -> None:
    ds = _ct()
    assoc = _associate(gateway)
    assert assoc.send_c_store(ds).Status == 0  # type: ignore[attr-defined]
    assert assoc.send_c_store(ds).Status == 0  # type: ignore[attr-defined]
    assert gateway.state.scalar("SELECT count(*) FROM instances") == 1
    assert gateway.state.scalar("SELECT instance_count FROM studies") == 1
    first = gateway.state.get_instance(str(ds.SOPInstanceUID))
    assert first is not None
    original_bytes = (gateway.settings.data_dir / first.path).read_bytes()
    changed = _ct()
    changed.SOPInstanceUID = ds.SOPInstanceUID
    changed.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    changed.StudyDescription = "edited after the first send"
    assert assoc.send_c_store(changed).Status == CONFLICT  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    # Never silently overwritten: the spooled file is the first one, the new one is kept aside.
    assert (gateway.settings.data_dir / first.path).read_bytes() == original_bytes
    rows = gateway.state.query("SELECT status, sop_instance_uid, path FROM quarantine")
    assert [(r[0], r[1]) for r in rows] == [(CONFLICT, str(ds.SOPInstanceUID))]
    kept = dcmread(gateway.settings.data_dir / rows[0][2])
    assert kept.StudyDescription == "edited after the first send"


def test_disk_reserve_gives_out_of_resources(tmp_path: Path) -> None:
    with InProcessGateway(tmp_path / "gw", disk_reserve_mb=10**9) as gw:
        assoc = _associate(gw)
        ds = _ct()
        assert assoc.send_c_store(ds).Status == OUT_OF_RESOURCES  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        assert gw.state.get_instance(str(ds.SOPInstanceUID)) is None
        assert not list((gw.settings.data_dir / "spool").rglob("*.dcm"))


def test_status_cli_lists_quarantine(gateway: InProcessGateway) -> None:
    ds = _ct()
    del ds.SeriesInstanceUID
    assoc = _associate(gateway)
    assert assoc.send_c_store(ds).Status == MISSING_UIDS  # type: ignore[attr-defined]
    assert assoc.send_c_store(_ct()).Status == 0  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "telerad.cli",
            "gateway",
            "status",
            "--json",
            "--data-dir",
            str(gateway.settings.data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    status = json.loads(out.stdout)
    assert status["quarantined"] == 1
    assert status["quarantine"][0]["status"] == MISSING_UIDS
    assert status["quarantine"][0]["sop_instance_uid"] == str(ds.SOPInstanceUID)
    assert len(status["studies"]) == 1 and status["studies"][0]["instances"] == 1
    human = subprocess.run(
        [
            sys.executable,
            "-m",
            "telerad.cli",
            "gateway",
            "status",
            "--data-dir",
            str(gateway.settings.data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "Quarantine" in human.stdout and "InstanceUID is missing" in human.stdout


def test_transfer_syntax_is_chosen_from_our_order(gateway: InProcessGateway) -> None:
    """Lossless compressed first, then Explicit VR: an instance arrives as it was made, even
    when the sender lists Implicit VR first; unknown syntaxes are refused, private SOP classes
    are accepted (as storescp --promiscuous)."""
    private_sop = "1.3.6.1.4.1.9590.100.1.2.999"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(
        CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGLSLossless]
    )
    ae.add_requested_context(
        "1.2.840.10008.5.1.4.1.1.7", [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    )
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.3.4.999"])  # MR, bogus syntax
    ae.add_requested_context(private_sop, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.aet)
    assert assoc.is_established
    accepted = {
        str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
    }
    assoc.release()
    assert accepted["1.2.840.10008.5.1.4.1.1.2"] == JPEGLSLossless
    assert accepted["1.2.840.10008.5.1.4.1.1.7"] == ExplicitVRLittleEndian
    assert "1.2.840.10008.5.1.4.1.1.4" not in accepted
    assert accepted[private_sop] == ExplicitVRLittleEndian


def test_dataset_uid_disagreeing_with_the_command_is_quarantined(
    gateway: InProcessGateway, tmp_path: Path
) -> None:
    """pynetdicom takes the command's Affected SOP Instance UID from the file meta when it
    sends a file as it is; a file whose meta and dataset disagree produces the mismatch."""
    ds = _ct()
    dataset_uid = str(ds.SOPInstanceUID)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta_len = int(
        dcmread(BytesIO(raw), stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    )
    command_uid = generate_uid()
    lying = copy.deepcopy(ds)
    lying.SOPInstanceUID = command_uid
    lying.file_meta.MediaStorageSOPInstanceUID = command_uid
    path = _file_with_body(tmp_path, lying, raw[128 + 4 + 12 + meta_len :])
    assert _send_raw_file(gateway, path) == UID_MISMATCH
    rows = gateway.state.query("SELECT status, sop_instance_uid, reason FROM quarantine")
    assert [(r[0], r[1]) for r in rows] == [(UID_MISMATCH, dataset_uid)]
    assert command_uid in rows[0][2]
    assert gateway.state.get_instance(dataset_uid) is None
