"""TLS on both links: HTTPS from gateway to hub, and DICOM TLS (mutual) at the listener."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from sample_studies.generate import make_ct_series
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
