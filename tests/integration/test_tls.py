"""TLS on both links: HTTPS from gateway to hub, and DICOM TLS (mutual) at the listener."""

from __future__ import annotations

import ssl
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_gateway.durable.forward import StudyWork, TransportError
from dicom_gateway.durable.scp import SUCCESS, Listener
from dicom_gateway.durable.spool import Spool
from dicom_gateway.durable.state import COMMITTED, PENDING, StateDB
from dicom_gateway.station.dicom_send import DicomTransport, destination_tls_args
from dicom_gateway.station.settings import DicomDestination, GatewaySettings
from sample_studies.generate import make_ct_series
from tests.support.peers import StoreSCP
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
        "-subj",
        "/CN=telerad test CA",
    )
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:modality")):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
            "-subj",
            f"/CN={name}",
        )
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            str(d / f"{name}.pem"),
            "-extfile",
            str(d / f"{name}.ext"),
        )
    return d


def test_gateway_uploads_over_https(tmp_path: Path, pki: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 3, seed=5, matrix=128)
    with InProcessHub(
        tmp_path / "hub", https_cert=pki / "server.pem", https_key=pki / "server.key"
    ) as hub:
        token = hub.add_station("tram-tls")
        url = f"https://127.0.0.1:{hub.hub.http_port}"
        # Without the private CA the gateway refuses the hub's certificate and keeps the data.
        with InProcessGateway(tmp_path / "gw-untrusting", hub_url=url, token=token) as gw:
            ae = AE(ae_title="CT01")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.aet)
            assert assoc.send_c_store(dcmread(files[0])).Status == 0
            assoc.release()
            detail = wait_until(
                lambda: gw.state.scalar("SELECT detail FROM links WHERE state = 'down'"),
                30,
                "link marked down",
            )
            assert "CERTIFICATE_VERIFY_FAILED" in detail
            assert hub.committed() == {}
        with InProcessGateway(
            tmp_path / "gw", hub_url=url, token=token, hub_ca=pki / "ca.pem"
        ) as gw:
            ae = AE(ae_title="CT01")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.aet)
            for f in files:
                assert assoc.send_c_store(dcmread(f)).Status == 0
            assoc.release()
            committed = wait_until(hub.committed, 60, "study committed over HTTPS")
            assert list(committed.values()) == [len(files)]


def test_dicom_tls_with_client_certificates(tmp_path: Path, pki: Path) -> None:
    with InProcessGateway(
        tmp_path / "gw",
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_ca=pki / "ca.pem",
    ) as gw:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        client.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        ae = AE(ae_title="CT01")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.aet, tls_args=(client, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        # Plain DICOM, or TLS without a client certificate, does not get an association.
        plain = AE(ae_title="CT01")
        plain.add_requested_context(Verification)
        plain.acse_timeout = plain.network_timeout = 5
        assert not plain.associate("127.0.0.1", gw.port, ae_title=gw.aet).is_established
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        ae2 = AE(ae_title="CT01")
        ae2.add_requested_context(Verification)
        ae2.acse_timeout = ae2.network_timeout = 5
        assert not ae2.associate(
            "127.0.0.1", gw.port, ae_title=gw.aet, tls_args=(anonymous, "127.0.0.1")
        ).is_established


def _spooled_study(data_dir: Path, destination: str, count: int) -> tuple[StateDB, Spool, str]:
    """``count`` CT instances of one study in a gateway spool, pending for ``destination``."""
    settings = GatewaySettings(data_dir=data_dir, disk_reserve_mb=1)
    spool = Spool(data_dir)
    state = StateDB(data_dir / "gateway.sqlite3")
    listener = Listener(settings, spool, state, [destination])
    study = generate_uid()
    for _ in range(count):
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert listener.store(buf.getvalue(), calling_aet="CT01").status == SUCCESS
    return state, spool, study


def _transport(dest: DicomDestination, state: StateDB, spool: Spool) -> DicomTransport:
    return DicomTransport(
        destination=dest.name,
        aet=dest.aet,
        host=dest.host,
        port=dest.port,
        calling_aet="TELERAD_GW",
        state=state,
        spool=spool,
        tls_args=destination_tls_args(dest),
    )


def _work(study: str, count: int) -> StudyWork:
    now = time.time()
    return StudyWork(study, 2, now, now, count, 0, "CT", "")


@pytest.mark.needs_dcmtk
def test_c_store_to_a_tls_destination_verifies_the_peer(tmp_path: Path, pki: Path) -> None:
    """DCMTK storescp with TLS that requires a client certificate (its default): the
    destination verifies storescp's certificate against its CA and presents ours."""
    tls = ["+tls", str(pki / "server.key"), str(pki / "server.pem"), "+cf", str(pki / "ca.pem")]
    with StoreSCP("TLS_PACS", extra_args=tls) as scp:
        base = {"name": "tls-pacs", "aet": scp.aet, "host": "127.0.0.1", "port": scp.port}
        state, spool, study = _spooled_study(tmp_path / "gw", "tls-pacs", 2)
        # Trusting only the system's CAs, the private CA's certificate is refused: nothing
        # is sent in clear, the instances stay pending for a later attempt.
        untrusting = DicomDestination(
            **base,
            tls=True,
            tls_cert=pki / "client.pem",
            tls_key=pki / "client.key",
        )
        with pytest.raises(TransportError, match="over TLS: check the peer certificate"):
            _transport(untrusting, state, spool).send(_work(study, 2), lambda: False)
        assert state.scalar("SELECT count(*) FROM deliveries WHERE state = ?", (PENDING,)) == 2
        # Plain DICOM to the TLS port gets no association either.
        plain = DicomDestination(**base)
        with pytest.raises(TransportError):
            _transport(plain, state, spool).send(_work(study, 2), lambda: False)
        assert scp.received_files() == []
        # With the CA and our client certificate, both instances are stored over TLS.
        dest = DicomDestination(
            **base,
            tls=True,
            ca=pki / "ca.pem",
            tls_cert=pki / "client.pem",
            tls_key=pki / "client.key",
        )
        assert _transport(dest, state, spool).send(_work(study, 2), lambda: False)
        files = scp.wait_for_files(2, 30)
        assert {str(dcmread(f).StudyInstanceUID) for f in files} == {study}
        assert state.scalar("SELECT count(*) FROM deliveries WHERE state = ?", (COMMITTED,)) == 2


def test_tls_destination_refuses_a_certificate_for_another_name(tmp_path: Path, pki: Path) -> None:
    """The peer's certificate must name the host (or ``tls_server_name``): our own TLS
    listener (certificate for 127.0.0.1 and localhost) reached under a name it lacks fails."""
    with InProcessGateway(
        tmp_path / "peer", tls_cert=pki / "server.pem", tls_key=pki / "server.key"
    ) as peer:
        base = {"name": "peer", "aet": peer.aet, "host": "127.0.0.1", "port": peer.port}
        state, spool, study = _spooled_study(tmp_path / "gw", "peer", 1)
        wrong = DicomDestination(
            **base, tls=True, ca=pki / "ca.pem", tls_server_name="pacs.example.org"
        )
        with pytest.raises(TransportError, match="over TLS"):
            _transport(wrong, state, spool).send(_work(study, 1), lambda: False)
        right = DicomDestination(**base, tls=True, ca=pki / "ca.pem", tls_server_name="localhost")
        assert _transport(right, state, spool).send(_work(study, 1), lambda: False)
        assert state.scalar("SELECT count(*) FROM deliveries WHERE state = ?", (COMMITTED,)) == 1
        assert peer.state.scalar("SELECT count(*) FROM instances") == 1
