"""The listener survives hostile peers (issue 9 §2): junk connections neither hold association
slots nor stay open, one address cannot take every slot, a C-STORE with an over-long command
UID gets a status (not an abort) and a quarantine entry, and bounded fuzzing of real C-STORE
PDUs leaves the listener answering, with every Success it gave recorded.

Real sockets on ephemeral ports; 127.0.0.2 and 127.0.0.3 are second and third peer addresses
(Linux routes all of 127/8 to lo)."""

from __future__ import annotations

import inspect
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_gateway.durable.scp import INVALID_UID, LOCAL_LIMIT_EXCEEDED
from tests.support.peers import echoscu, storescu
from tests.support.telerad_procs import InProcessGateway, wait_until

LONG_UID = "1.2.826.0.1.3680043.8.498." + "1" * 44  # 70 characters
assert len(LONG_UID) == 70


def _ct(sop_uid: str | None = None) -> Dataset:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[InProcessGateway]:
    with InProcessGateway(tmp_path / "gw") as gw:
        yield gw


def _ae(calling: str = "MODALITY") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae


def _associate(gw: InProcessGateway, source: str = "127.0.0.1", **kwargs: Any) -> Association:
    return _ae().associate(
        "127.0.0.1", gw.port, ae_title=gw.aet, bind_address=(source, 0), **kwargs
    )


def _echo(gw: InProcessGateway, source: str = "127.0.0.1") -> int:
    assoc = _associate(gw, source)
    assert assoc.is_established, "association refused"
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _open_slots(gw: InProcessGateway) -> int:
    server = gw.gateway.listener._server
    assert server is not None
    return len(server.active_associations)


# ------------------------------------------------------------------ (a) junk connections


def _junk(port: int, rng: random.Random) -> dict[str, list[socket.socket]]:
    """20 connections of random bytes, 20 that say nothing, and 2 that announce a 4 GB
    A-ASSOCIATE-RQ and send 10 bytes of it (stock pynetdicom reads those forever)."""
    kinds: dict[str, list[socket.socket]] = {"random": [], "silent": [], "announce": []}
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(rng.randbytes(rng.randrange(1, 4000)))
        kinds["random"].append(sock)
    for _ in range(20):
        kinds["silent"].append(socket.create_connection(("127.0.0.1", port), timeout=5))
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"\x01\x00\xff\xff\xff\xff" + b"\x00\x01" + b"\x00" * 8)
        kinds["announce"].append(sock)
    return kinds


def _seconds_to_eof(socks: list[socket.socket], started: float, limit_s: float) -> list[float]:
    """When each socket saw the listener close it (EOF or reset); ``inf`` if not by limit."""
    closed: dict[int, float] = {}
    for sock in socks:
        sock.setblocking(False)
    end = started + limit_s
    while len(closed) < len(socks) and time.monotonic() < end:
        for i, sock in enumerate(socks):
            if i in closed:
                continue
            try:
                while sock.recv(65536):  # A-ABORTs first, then EOF
                    pass
            except BlockingIOError:
                continue
            except OSError:
                pass  # reset: closed too
            closed[i] = time.monotonic() - started
        time.sleep(0.02)
    for sock in socks:
        sock.close()
    return [closed.get(i, float("inf")) for i in range(len(socks))]


def _junk_then(gw: InProcessGateway, real_echo: Callable[[], None]) -> None:
    started = time.monotonic()
    kinds = _junk(gw.port, random.Random(20260901))
    time.sleep(0.2)  # let the listener accept them all (backlog 5: some took a SYN retry)
    real_echo()  # while all 42 are open
    limit_s = 30.0
    times = {kind: _seconds_to_eof(socks, started, limit_s) for kind, socks in kinds.items()}
    report = ", ".join(f"{kind}: {min(t):.1f}-{max(t):.1f} s" for kind, t in times.items() if t)
    print(f"junk connections closed by the listener after {report}")  # the measurement
    for kind, t in times.items():
        assert max(t) < limit_s, f"{kind} connections still open after {limit_s:.0f} s: {t}"
    wait_until(lambda: _open_slots(gw) == 0, 15, "association threads to end")
    assert _echo(gw) == 0


def test_junk_connections_hold_no_slots_and_are_closed(gateway: InProcessGateway) -> None:
    """Before: 16 such connections held every slot for ~30 s (C-ECHO rejected, local limit
    exceeded) and the random-bytes ones stayed open as long as the peer kept them."""

    def real_echo() -> None:
        assert _echo(gateway) == 0
        assert _echo(gateway, "127.0.0.2") == 0

    _junk_then(gateway, real_echo)


@pytest.mark.needs_dcmtk
def test_junk_connections_do_not_keep_dcmtk_out(gateway: InProcessGateway) -> None:
    def real_echo() -> None:
        res = echoscu("127.0.0.1", gateway.port, gateway.aet, "MODALITY")
        assert res.returncode == 0, res.stderr

    _junk_then(gateway, real_echo)


def test_silent_tls_connection_does_not_stop_the_listener(
    tmp_path: Path, tls_pki: tuple[Path, Path]
) -> None:
    """pynetdicom handshakes in its accept loop: one silent connection stopped every other
    for as long as it stayed open. The handshake now runs per connection."""
    import ssl

    cert, key = tls_pki
    with InProcessGateway(tmp_path / "gw", tls_cert=cert, tls_key=key) as gw:
        silent = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        plain = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        plain.sendall(b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16)  # DICOM, not TLS
        time.sleep(0.2)
        ctx = ssl.create_default_context(cafile=str(cert))
        ae = _ae()
        ae.acse_timeout = ae.connection_timeout = 10
        assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.aet, tls_args=(ctx, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        times = _seconds_to_eof([silent, plain], time.monotonic(), 30)
        print(f"silent / non-TLS connections to the TLS port closed after {times} s")
        assert max(times) < 30


@pytest.fixture
def tls_pki(tmp_path: Path) -> tuple[Path, Path]:
    import subprocess

    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


# --------------------------------------------------------------- (b) slots per peer address


def test_one_peer_over_its_share_is_rejected_while_others_get_in(tmp_path: Path) -> None:
    with InProcessGateway(tmp_path / "gw", max_associations=3, max_associations_per_peer=2) as gw:
        # Connections that never associate do not count against the address either.
        silent = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(6)]
        first, second = _associate(gw), _associate(gw)
        assert first.is_established and second.is_established
        third = _associate(gw)
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == LOCAL_LIMIT_EXCEEDED
        # Another address still gets in, up to the total.
        other = _associate(gw, "127.0.0.2")
        assert other.is_established and other.send_c_echo().Status == 0
        over_total = _associate(gw, "127.0.0.3")
        assert over_total.is_rejected
        # A released association frees its slot for its own address.
        first.release()
        again = wait_until(lambda: (a := _associate(gw)).is_established and a, 5, "the freed slot")
        assert again.send_c_echo().Status == 0
        for assoc in (again, second, other):
            assoc.release()
        for sock in silent:
            sock.close()


# ------------------------------------------------------------ (c) over-long command UIDs


def _lengthen_command_uid(keyword: str, value: str) -> Callable[[evt.Event], None]:
    """An SCU-side EVT_DIMSE_SENT handler: put ``value`` in the C-STORE-RQ command set after
    pynetdicom validated it (a pynetdicom SCU refuses to send such a UID itself)."""

    def handler(event: evt.Event) -> None:
        message = event.message
        if isinstance(message, C_STORE_RQ):
            setattr(message.command_set, keyword, value)
            message._set_command_group_length()

    return handler


@pytest.mark.parametrize("keyword", ["AffectedSOPInstanceUID", "AffectedSOPClassUID"])
def test_command_uid_over_64_characters_is_refused_not_aborted(
    gateway: InProcessGateway, keyword: str
) -> None:
    responses: list[Dataset] = []
    handlers = [
        (evt.EVT_DIMSE_SENT, _lengthen_command_uid(keyword, LONG_UID)),
        (evt.EVT_DIMSE_RECV, lambda event: responses.append(event.message.command_set)),
    ]
    assoc = _associate(gateway, evt_handlers=handlers)
    assert assoc.is_established
    ds = _ct()
    status = assoc.send_c_store(ds)
    assert status.Status == INVALID_UID
    # The association goes on: a good instance is stored on it.
    assoc.unbind(evt.EVT_DIMSE_SENT, handlers[0][1])
    good = _ct()
    assert assoc.send_c_store(good).Status == 0
    assoc.release()
    # Our placeholder never reaches the modality: the optional UID is left out instead.
    assert keyword not in responses[0] and responses[1].Status == 0
    rows = gateway.state.query("SELECT status, reason, sop_instance_uid, path FROM quarantine")
    assert len(rows) == 1
    status_code, reason, sop_uid, path = rows[0]
    assert status_code == INVALID_UID
    assert keyword in reason and "64" in reason and LONG_UID in reason
    expected_uid = LONG_UID if keyword == "AffectedSOPInstanceUID" else str(ds.SOPInstanceUID)
    assert sop_uid == expected_uid
    kept = dcmread(gateway.settings.data_dir / path)
    assert kept.SOPInstanceUID == ds.SOPInstanceUID  # the dataset as sent
    meta_key = "MediaStorageSOP" + keyword.removeprefix("AffectedSOP")
    assert getattr(kept.file_meta, meta_key) == LONG_UID  # the command's UIDs as sent
    assert gateway.state.get_instance(str(ds.SOPInstanceUID)) is None
    assert gateway.state.get_instance(str(good.SOPInstanceUID)) is not None
    assert not gateway.gateway.listener._bad_command_uids  # nothing left behind


@pytest.mark.needs_dcmtk
def test_dcmtk_storescu_with_a_70_character_uid_gets_a_failure_status(
    gateway: InProcessGateway, tmp_path: Path
) -> None:
    """DCMTK (3.6.7) cuts the command's UID to 64 characters itself (seen in
    EVT_DIMSE_RECV); the dataset keeps its 70, which the identity rule refuses."""
    ds = _ct()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = LONG_UID
    path = tmp_path / "long-uid.dcm"
    with pytest.warns(UserWarning):  # pydicom: over the UI length, written anyway
        ds.save_as(path, enforce_file_format=True)
    res = storescu([path], "127.0.0.1", gateway.port, gateway.aet, "MODALITY", ["-v"])
    output = res.stdout + res.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in output, output
    assert "abort" not in output.lower(), output
    rows = gateway.state.query("SELECT status, sop_instance_uid FROM quarantine")
    assert [tuple(r) for r in rows] == [(INVALID_UID, LONG_UID)]


# ---------------------------------------------------------------- pynetdicom still works so


def test_pynetdicom_still_aborts_where_and_how_we_hook_in() -> None:
    """The hooks rely on pynetdicom 3.0 internals; fail here when a new version moves them."""
    from pynetdicom.acse import ACSE
    from pynetdicom.dimse import DIMSEServiceProvider

    # The limit we replace counts every association thread (one per TCP connection).
    assert "self.assoc.ae.active_associations" in inspect.getsource(ACSE._negotiate_as_acceptor)
    # acse_timeout is the ARTIM timeout, and the acceptor's wait for the A-ASSOCIATE-RQ.
    assert "self.dul.artim_timer.timeout = value" in inspect.getsource(Association)
    assert "receive_pdu(wait=True, timeout=self.acse_timeout)" in inspect.getsource(
        Association.run_reactor
    )
    # Over-long UIDs fail validation when the message becomes a primitive...
    assert _config.VALIDATORS["UI"](UID(LONG_UID))[0] is False
    receive = inspect.getsource(DIMSEServiceProvider.receive_primitive)
    # ...which happens after EVT_DIMSE_RECV, where our handler replaces them;
    assert receive.index("evt.EVT_DIMSE_RECV") < receive.index("message_to_primitive()")
    # the response is encoded after EVT_DIMSE_SENT, where we drop the placeholder.
    send = inspect.getsource(DIMSEServiceProvider.send_msg)
    assert send.index("evt.EVT_DIMSE_SENT") < send.index("encode_msg(")
    assert callable(DIMSEMessage._set_command_group_length)
    # _guard_dul: DT-2 looks receive_primitive up on the association's DIMSE provider, the DUL
    # loop calls its state machine's do_action, which re-raises; a queued primitive is only
    # peeked at (so a dropped one must be taken off the queue); P-DATA in Sta13 is invalid.
    from pynetdicom import fsm
    from pynetdicom.dul import DULServiceProvider

    assert "dul.assoc.dimse.receive_primitive(" in inspect.getsource(fsm.DT_2)
    assert "self.state_machine.do_action(event)" in inspect.getsource(
        DULServiceProvider.run_reactor
    )
    assert inspect.getsource(fsm.StateMachine.do_action).rstrip().endswith("raise")
    assert "self.to_provider_queue.queue[0]" in inspect.getsource(
        DULServiceProvider._process_recv_primitive
    )
    assert ("Evt9", "Sta13") not in fsm.TRANSITION_TABLE


def test_reaper_shuts_only_overdue_connections_that_never_associated(
    gateway: InProcessGateway,
) -> None:
    listener = gateway.gateway.listener
    assoc = _associate(gateway)
    assert assoc.is_established
    assert listener._reap_overdue(time.monotonic() + 3600) == 0  # established: left alone
    assert assoc.send_c_echo().Status == 0
    assoc.release()


# --------------------------------------------------------------------------- (d) bounded fuzz


_TEMPLATE_UID = "2.25." + "7" * 39


def _capture_store(gw: InProcessGateway) -> list[bytes]:
    """The PDUs a pynetdicom SCU sends for one C-STORE: A-ASSOCIATE-RQ, P-DATA-TF...,
    A-RELEASE-RQ (the instance it stores is a real one, under ``_TEMPLATE_UID``)."""
    sent: list[bytes] = []
    handlers = [(evt.EVT_PDU_SENT, lambda event: sent.append(event.pdu.encode()))]
    assoc = _associate(gw, evt_handlers=handlers)
    assert assoc.send_c_store(_ct(_TEMPLATE_UID)).Status == 0
    assoc.release()
    assert sent[0][0] == 0x01 and sent[-1][0] == 0x05
    return sent


def _read_pdu(sock: socket.socket) -> bytes | None:
    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    header = exactly(6)
    if header is None:
        return None
    body = exactly(struct.unpack(">L", header[2:6])[0])
    return None if body is None else header + body


def _store_responses(pdu: bytes, command: bytearray) -> list[Dataset]:
    """Command sets completed by this P-DATA-TF (``command`` carries fragments across)."""
    done: list[Dataset] = []
    pos = 6
    while pos + 6 <= len(pdu):
        length = struct.unpack(">L", pdu[pos : pos + 4])[0]
        control, data = pdu[pos + 5], pdu[pos + 6 : pos + 4 + length]
        pos += 4 + length
        if control & 1:
            command += data
            if control & 2:
                done.append(decode(BytesIO(bytes(command)), True, True))
                command.clear()
    return done


def _mutate(rng: random.Random, pdus: list[bytes]) -> list[bytes]:
    pdus = list(pdus)
    roll = rng.random()
    target = 0 if roll < 0.1 else rng.randrange(1, len(pdus) - 1)
    data = bytearray(pdus[target])
    if roll < 0.85:
        for _ in range(rng.randrange(1, 9)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif roll < 0.95:
        del data[rng.randrange(len(data)) :]
    else:
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randrange(1, 64))
    pdus[target] = bytes(data)
    return pdus


def _fuzz_once(port: int, pdus: list[bytes]) -> list[tuple[int, str]]:
    """Play ``pdus`` on a raw connection; the (Status, Affected SOP Instance UID) answered."""
    answered: list[tuple[int, str]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(pdus[0])
            reply = _read_pdu(sock)
            if reply is None or reply[0] != 0x02:
                return answered
            for pdu in pdus[1:]:
                sock.sendall(pdu)
            sock.settimeout(0.5)  # a mutated length can leave the listener waiting for more
            command = bytearray()
            while (pdu := _read_pdu(sock)) is not None and pdu[0] == 0x04:
                for rsp in _store_responses(pdu, command):
                    uid = str(rsp.get("AffectedSOPInstanceUID", ""))
                    answered.append((int(rsp.Status), uid))
        except OSError:
            pass  # reset, timeout: the listener may close on us
    return answered


@pytest.mark.slow
def test_bounded_fuzz_of_real_store_pdus(
    gateway: InProcessGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    died: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    template = _capture_store(gateway)
    rng = random.Random(int(os.environ.get("TELERAD_FUZZ_SEED", "92026")))  # fixed seed
    statuses: dict[int, int] = {}
    successes: list[str] = []
    started = time.monotonic()
    iterations = 300
    for i in range(iterations):
        uid = f"2.25.{8 * 10**38 + i:039d}"  # same length as the template's: no lengths move
        assert len(uid) == len(_TEMPLATE_UID)
        pdus = [p.replace(_TEMPLATE_UID.encode(), uid.encode()) for p in template]
        for status, answered_uid in _fuzz_once(gateway.port, _mutate(rng, pdus)):
            statuses[status] = statuses.get(status, 0) + 1
            if status == 0:
                successes.append(answered_uid.rstrip("\0 "))
    elapsed = time.monotonic() - started
    print(f"{iterations} mutated C-STOREs in {elapsed:.1f} s; statuses {statuses}")
    # The listener still answers, stores, and every Success it gave is recorded.
    assert _echo(gateway) == 0
    good = _ct()
    assoc = _associate(gateway)
    assert assoc.send_c_store(good).Status == 0
    assoc.release()
    assert gateway.state.get_instance(str(good.SOPInstanceUID)) is not None
    assert successes, "no mutated instance was stored: the fuzz exercised nothing"
    missing = [u for u in successes if gateway.state.get_instance(u) is None]
    assert not missing, f"answered Success but not recorded: {missing}"
    assert not died, [f"{d.thread}: {d.exc_value!r}" for d in died]
    wait_until(lambda: _open_slots(gateway) == 0, 15, "association threads to end")
    listener = gateway.gateway.listener
    assert listener._reaper is not None and listener._reaper.is_alive()
