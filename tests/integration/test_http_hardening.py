"""The hub's HTTP surface is closed by default, checked over real HTTP against uvicorn:
API docs off unless asked, /metrics movable to a loopback listener, JSON bodies limited before
they are parsed, and stations authenticated before a byte of their body is read.

Raw sockets send only what a test says (headers without the body they announce): an answer
that arrives proves the hub did not wait for, nor read, the body.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from sample_studies.generate import make_ct_series
from tests.support.peers import free_port, storescu
from tests.support.telerad_procs import GatewayProcess, HubProcess, InProcessHub, wait_until

MANIFEST = "/api/v1/ingest/studies/{uid}/manifest"
#: No DICOM listener: these tests are about the HTTP surface only.
NO_DICOM = -1


def _hub(data_dir: Path, **overrides: object) -> InProcessHub:
    return InProcessHub(data_dir, dicom_port=NO_DICOM, **overrides)


def _hub_process(data_dir: Path, **kw: Any) -> HubProcess:
    return HubProcess(data_dir, dicom_port=NO_DICOM, **kw)


def _raw(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (and ``body``) on a fresh connection, read the answer until the hub
    closes the connection: (status, headers, body). The socket timeout is a safety net."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    raw_head, _, payload = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def _manifest(n: int) -> dict[str, object]:
    return {
        "priority": 2,
        "modality": "CT",
        "body_part": "CHEST",
        "instances": [
            {
                "sop_instance_uid": generate_uid(),
                "size": 524_288 + i,
                "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
            }
            for i in range(n)
        ],
    }


@pytest.fixture
def small_limit_hub(tmp_path: Path) -> Iterator[tuple[InProcessHub, str]]:
    """A hub whose JSON bodies may be at most 16 KiB, and a station token for it."""
    with _hub(tmp_path / "hub", max_json_body_kb=16) as hub:
        yield hub, hub.add_station("tram-limit")


# -- API docs -----------------------------------------------------------------------------------


def test_api_docs_are_off_by_default_and_on_when_asked(tmp_path: Path) -> None:
    with _hub(tmp_path / "closed") as hub:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert httpx.get(hub.url + path).status_code == 404, path
        assert httpx.get(hub.url + "/healthz").status_code == 200
    with _hub(tmp_path / "open", api_docs=True) as hub:
        schema = httpx.get(hub.url + "/openapi.json")
        assert schema.status_code == 200
        assert "/api/v1/ingest/studies/{study_uid}/manifest" in schema.json()["paths"]
        assert "swagger" in httpx.get(hub.url + "/docs").text.lower()
        assert httpx.get(hub.url + "/redoc").status_code == 200


def test_hub_serve_api_docs_flag(tmp_path: Path) -> None:
    with _hub_process(tmp_path / "hub-closed") as hub:
        assert httpx.get(hub.url + "/openapi.json").status_code == 404
    opened = _hub_process(tmp_path / "hub-open")
    opened.args.append("--api-docs")
    with opened as hub:
        assert httpx.get(hub.url + "/openapi.json").status_code == 200
        assert "API docs on /docs" in hub.log_text()


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_on_the_main_app_by_default(tmp_path: Path) -> None:
    with _hub(tmp_path / "hub") as hub:
        assert hub.hub.metrics_port is None
        res = httpx.get(hub.url + "/metrics")
        assert res.status_code == 200 and "telerad_" in res.text


def test_metrics_on_a_separate_listener_are_not_on_the_main_app(tmp_path: Path) -> None:
    with _hub(tmp_path / "hub", metrics_port=0) as hub:
        port = hub.hub.metrics_port
        assert port is not None and port != hub.hub.http_port
        assert httpx.get(hub.url + "/metrics").status_code == 404
        res = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert res.status_code == 200 and "telerad_" in res.text
    # stopped with the hub
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")


def test_hub_serve_metrics_port_setting(tmp_path: Path) -> None:
    port = free_port()
    with _hub_process(tmp_path / "hub", env={"TELERAD_METRICS_PORT": str(port)}) as hub:
        assert httpx.get(hub.url + "/metrics").status_code == 404
        assert "telerad_" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert f"metrics on http://127.0.0.1:{port}/metrics" in hub.log_text()


# -- body limits --------------------------------------------------------------------------------


def test_a_5000_instance_manifest_fits_the_default_limit(tmp_path: Path) -> None:
    manifest = _manifest(5000)
    size = len(json.dumps(manifest))
    assert 500_000 < size < 8 * 1024 * 1024
    study = generate_uid()
    with _hub(tmp_path / "hub") as hub:
        token = hub.add_station("tram-big")
        res = httpx.post(
            hub.url + MANIFEST.format(uid=study),
            json=manifest,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert res.status_code == 200, res.text
        assert len(res.json()["missing"]) == 5000


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    small_limit_hub: tuple[InProcessHub, str],
) -> None:
    hub, token = small_limit_hub
    # Only the head goes out: the 413 comes back without the hub waiting for the body.
    status, headers, body = _raw(
        hub.hub.http_port,
        f"POST {MANIFEST.format(uid=generate_uid())} HTTP/1.1\nHost: hub\n"
        f"Authorization: Bearer {token}\nContent-Type: application/json\n"
        f"Content-Length: {20 * 1024 * 1024}\n",
    )
    assert status == 413
    assert headers["connection"] == "close"
    detail = json.loads(body)["detail"]
    assert "request body of 20 MiB is over this hub's limit of 16384 bytes" in detail
    assert "max_json_body_kb" in detail


def test_a_chunked_body_is_counted_as_it_streams_and_refused_past_the_limit(
    small_limit_hub: tuple[InProcessHub, str],
) -> None:
    hub, token = small_limit_hub
    piece = b"[" + b"1," * 2500  # 5 KB each; four of them pass 16 KiB
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(4))
    status, headers, body = _raw(
        hub.hub.http_port,
        f"POST {MANIFEST.format(uid=generate_uid())} HTTP/1.1\nHost: hub\n"
        f"Authorization: Bearer {token}\nContent-Type: application/json\n"
        "Transfer-Encoding: chunked\n",
        chunks,  # no final 0-length chunk: the hub must not wait for the end
    )
    assert status == 413
    assert "passed this hub's limit of 16384 bytes" in json.loads(body)["detail"]
    assert headers["connection"] == "close"


def test_a_chunked_body_under_the_limit_is_parsed(
    small_limit_hub: tuple[InProcessHub, str],
) -> None:
    hub, token = small_limit_hub
    data = json.dumps(_manifest(20)).encode()
    assert len(data) < 16 * 1024

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    res = httpx.post(
        hub.url + MANIFEST.format(uid=generate_uid()),
        content=pieces(),  # an iterator: httpx sends it chunked
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert res.request.headers.get("transfer-encoding") == "chunked"
    assert res.status_code == 200, res.text
    assert len(res.json()["missing"]) == 20


def test_tus_bundle_uploads_keep_their_own_limit(
    small_limit_hub: tuple[InProcessHub, str],
) -> None:
    hub, token = small_limit_hub
    tus = {"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
    meta = ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}"
        for k, v in {"study_uid": generate_uid(), "bundle_sha256": "ab" * 32}.items()
    )
    length = 200 * 1024
    created = httpx.post(
        hub.url + "/api/v1/ingest/uploads",
        headers={**tus, "Upload-Length": str(length), "Upload-Metadata": meta},
    )
    assert created.status_code == 201, created.text
    piece = b"\x00" * (64 * 1024)  # four times the JSON limit, in one PATCH
    res = httpx.patch(
        hub.url + created.headers["location"],
        content=piece,
        headers={
            **tus,
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert res.status_code == 204, res.text
    assert res.headers["upload-offset"] == str(len(piece))


# -- authentication before the body -------------------------------------------------------------


@pytest.mark.parametrize("authorization", ["", "Authorization: Bearer not-a-station-token\n"])
def test_an_unauthenticated_large_body_is_refused_401_without_reading_it(
    small_limit_hub: tuple[InProcessHub, str], authorization: str
) -> None:
    hub, _ = small_limit_hub
    for framing in (f"Content-Length: {1024**3}\n", "Transfer-Encoding: chunked\n"):
        status, headers, body = _raw(
            hub.hub.http_port,
            f"POST {MANIFEST.format(uid=generate_uid())} HTTP/1.1\nHost: hub\n"
            f"{authorization}Content-Type: application/json\n{framing}",
        )
        # 401, not 413: whoever has no token learns nothing, and no body byte was needed
        assert status == 401, (framing, body)
        assert headers["www-authenticate"] == "Bearer"
        assert headers["connection"] == "close"
        expected = (
            "unknown or revoked station token"
            if authorization
            else "station token required: Authorization: Bearer <token>"
        )
        assert json.loads(body)["detail"] == expected


def test_every_upload_protocol_route_needs_a_token_except_tus_discovery(
    tmp_path: Path,
) -> None:
    with _hub(tmp_path / "hub") as hub:
        study = generate_uid()
        for method, path in (
            ("POST", MANIFEST.format(uid=study)),
            ("POST", f"/api/v1/ingest/studies/{study}/commit"),
            ("POST", "/api/v1/ingest/uploads"),
            ("HEAD", "/api/v1/ingest/uploads/x"),
            ("PATCH", "/api/v1/ingest/uploads/x"),
            ("GET", "/api/v1/ingest/no-such-route"),
        ):
            res = httpx.request(method, hub.url + path, headers={"Tus-Resumable": "1.0.0"})
            assert res.status_code == 401, (method, path)
        options = httpx.options(hub.url + "/api/v1/ingest/uploads")
        assert options.status_code == 204 and options.headers["tus-version"] == "1.0.0"
        # an authenticated station still gets through, with its JSON body parsed
        token = hub.add_station("tram-ok")
        res = httpx.post(
            hub.url + MANIFEST.format(uid=study),
            json={"instances": []},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert res.status_code == 200 and res.json() == {"missing": []}
        bad = httpx.post(
            hub.url + MANIFEST.format(uid=study),
            json={"instances": [{"sop_instance_uid": "1.2"}]},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert bad.status_code == 422


# -- the station token from a file ---------------------------------------------------------------


@pytest.mark.needs_dcmtk
def test_gateway_serve_reads_its_token_from_a_file(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "ct", 2, seed=41, matrix=64)
    with _hub(tmp_path / "hub") as hub:
        token_file = tmp_path / "station.token"
        token_file.write_text(hub.add_station("tram-file") + "\n")
        token_file.chmod(0o600)
        gw = GatewayProcess(tmp_path / "gw", hub_url=hub.url, token=None)
        gw.args += ["--token-file", str(token_file)]
        with gw:
            assert storescu(files, "127.0.0.1", gw.dicom_port, gw.aet, "CT01").returncode == 0
            committed = wait_until(hub.committed, 60, "study committed with the file's token")
            assert list(committed.values()) == [2]
        log = gw.log_text()
        assert "--token is visible" not in log and "readable by other users" not in log
