"""Destination type ``dicom``: the gateway forwards by C-STORE to real peers, and ``telerad
gateway send`` pushes folders to them.

Peers: Orthanc and DCMTK ``storescp`` (both accept compressed syntaxes), and a picky
pynetdicom SCP run as a separate process (CT only, uncompressed only, statuses scripted per
instance). It must be a separate process: the gateway's listener turns on pynetdicom's
process-wide "unrestricted storage" mode, under which any SCP in the same process accepts
every storage SOP class in whatever syntax the caller lists first.

``storescp`` runs with ``+uf`` (a new file name per received instance), so counting its files
counts C-STOREs and a duplicate delivery cannot hide by overwriting a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Self

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)

from dicom_gateway.durable.state import COMMITTED, FAILED, PENDING
from dicom_gateway.station.dicom_send import MAX_ATTEMPTS
from dicom_gateway.station.service import gateway_status
from dicom_gateway.station.settings import DicomDestination
from sample_studies.generate import committed_samples, make_ct_series, restamp
from tests.support import peers
from tests.support.peers import (
    OrthancServer,
    StoreSCP,
    free_port,
    storescu,
    wait_for_port,
)
from tests.support.telerad_procs import InProcessGateway, wait_until

#: pydicom test files, one per transfer syntax family (their SOP Instance UIDs are distinct).
PYDICOM_FILES = [
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_rle.dcm",  # RLE lossless, RGB
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 lossless
    "JPEG2000.dcm",  # JPEG 2000 (lossy)
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "examples_ybr_color.dcm",  # JPEG baseline, multi-frame ultrasound
    "JPGExtended.dcm",  # JPEG extended
    "image_dfl.dcm",  # deflated explicit VR little endian
    "SC_rgb_small_odd_big_endian.dcm",  # explicit VR big endian (retired, still seen)
    "CT_small.dcm",  # explicit VR little endian
    "rtplan.dcm",  # implicit VR little endian, no pixels
]
#: Shares its SOP Instance UID with SC_rgb_rle.dcm, so it is sent with fresh UIDs.
JPEG_LOSSLESS_SV1 = "SC_rgb_jpeg_gdcm.dcm"

STRICT_SCP_SOURCE = r'''
"""Picky C-STORE SCP: CT Image Storage only, uncompressed only; statuses scripted per SOP
Instance UID ("busy" = 0xA700 until the flag file exists); one JSON line per C-STORE."""
import hashlib, json, sys, threading
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

cfg = json.loads(Path(sys.argv[1]).read_text())
flag = Path(cfg["flag"])
lock = threading.Lock()
log = open(cfg["log"], "a", buffering=1)


def on_store(event):
    ds = event.dataset
    uid = str(ds.SOPInstanceUID)
    rule = cfg["statuses"].get(uid, "ok")
    if rule == "busy":
        status = 0 if flag.exists() else 0xA700
    else:
        status = 0 if rule == "ok" else int(rule, 16)
    pixels = hashlib.sha256(bytes(ds.PixelData)).hexdigest() if "PixelData" in ds else ""
    line = {"uid": uid, "ts": str(event.context.transfer_syntax), "status": status,
            "pixels": pixels}
    with lock:
        log.write(json.dumps(line) + "\n")
    return status


ae = AE(cfg["aet"])
ae.maximum_pdu_size = 0
ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2",
                         [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
ae.start_server(("127.0.0.1", cfg["port"]), evt_handlers=[(evt.EVT_C_STORE, on_store)])
'''


# ------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Sent:
    """A file pushed into the gateway, keyed by SOP Instance UID."""

    path: Path
    sop_uid: str
    sop_class: str
    transfer_syntax: str


def _index(paths: list[Path]) -> dict[str, Sent]:
    out: dict[str, Sent] = {}
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        uid = str(ds.SOPInstanceUID)
        assert uid not in out, f"{p.name} and {out[uid].path.name} share a SOP Instance UID"
        out[uid] = Sent(p, uid, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    return out


def _push_set(root: Path) -> dict[str, Sent]:
    """The committed samples (uncompressed CT + CR) and pydicom's compressed test files."""
    (root / "samples").mkdir(parents=True)
    for f in committed_samples():
        shutil.copy(f, root / "samples" / f.name)
    (root / "pydicom").mkdir()
    for name in PYDICOM_FILES:
        shutil.copy(str(get_testdata_file(name)), root / "pydicom" / name)
    restamp([Path(str(get_testdata_file(JPEG_LOSSLESS_SV1)))], root / "pydicom", salt="sv1")
    files = _index(sorted(root.rglob("*.dcm")))
    syntaxes = {UID(s.transfer_syntax).name for s in files.values()}
    assert {"JPEG-LS Lossless Image Compression", "RLE Lossless", "JPEG Baseline (Process 1)"} <= (
        syntaxes
    ), syntaxes
    return files


def _push(paths: list[Path], gw: InProcessGateway, expected: int) -> None:
    """storescu into the gateway; each answered C-STORE is durable and recorded by then."""
    res = storescu(paths, "127.0.0.1", gw.port, gw.aet, "MODALITY")
    assert res.returncode == 0, res.stderr[-3000:]
    recorded = gw.state.scalar("SELECT count(*) FROM instances")
    assert recorded == expected, f"gateway holds {recorded}/{expected}\n{res.stderr[-3000:]}"


def _assert_same_instance(sent: Sent, arrived: Dataset, where: str) -> None:
    """Arrived in the syntax it was made in, every attribute and the pixel data unchanged."""
    original = dcmread(sent.path)
    name = f"{sent.path.name} at {where}"
    assert arrived.file_meta.TransferSyntaxUID == sent.transfer_syntax, (
        f"{name}: arrived as {arrived.file_meta.TransferSyntaxUID.name}, "
        f"made as {UID(sent.transfer_syntax).name}"
    )
    for elem in original:
        # Group lengths and trailing padding are re-computed or dropped by any encoder.
        if elem.tag in (0x7FE00010, 0xFFFCFFFC) or elem.tag.element == 0x0000:
            continue
        assert elem.tag in arrived, f"{name}: {elem.keyword or elem.tag} lost"
        assert arrived[elem.tag].value == elem.value, f"{name}: {elem.keyword} changed"
    if "PixelData" in original:
        assert arrived.PixelData == original.PixelData, f"{name}: pixel data bytes differ"


def _deliveries(gw: InProcessGateway, destination: str) -> dict[str, dict[str, Any]]:
    rows = gw.state.query(
        "SELECT sop_instance_uid, state, attempts, last_status FROM deliveries "
        "WHERE destination = ?",
        (destination,),
    )
    return {r[0]: {"state": r[1], "attempts": r[2], "last_status": r[3]} for r in rows}


def _wait_settled(
    gw: InProcessGateway, destination: str, expected: int, deadline_s: float = 60
) -> dict[str, dict[str, Any]]:
    """Wait until every instance reached a final state (committed or failed) there."""

    def settled() -> bool:
        rows = _deliveries(gw, destination)
        return len(rows) == expected and all(
            d["state"] in (COMMITTED, FAILED) for d in rows.values()
        )

    try:
        wait_until(settled, deadline_s, f"{expected} deliveries to {destination} settled")
    except TimeoutError as exc:
        states = Counter(d["state"] for d in _deliveries(gw, destination).values())
        quarantined = gw.state.scalar("SELECT count(*) FROM quarantine")
        raise AssertionError(
            f"{exc}: {dict(states)}, quarantined {quarantined}, link {_link(gw, destination)}"
        ) from None
    return _deliveries(gw, destination)


def _link(gw: InProcessGateway, destination: str) -> dict[str, Any] | None:
    rows = gw.state.query(
        "SELECT state, detail, next_attempt FROM links WHERE destination = ?", (destination,)
    )
    return dict(rows[0]) if rows else None


def _wait_link_up(gw: InProcessGateway, destination: str) -> None:
    """The link is marked up after the last instance of a pass is recorded: poll for it."""
    wait_until(lambda: (_link(gw, destination) or {}).get("state") == "up", 30, f"{destination} up")


def _storescp_by_uid(scp: StoreSCP) -> Counter[str]:
    return Counter(
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received_files()
    )


def _destination(name: str, aet: str, port: int) -> DicomDestination:
    return DicomDestination(name=name, aet=aet, host="127.0.0.1", port=port)


class ScriptedSCP:
    """The picky pynetdicom SCP above, in its own process, on a free loopback port."""

    def __init__(self, workdir: Path, statuses: dict[str, str], aet: str = "PICKY") -> None:
        self.aet = aet
        self.port = free_port()
        self.flag = workdir / "recovered"
        self.log = workdir / "stores.jsonl"
        self._script = workdir / "picky_scp.py"
        self._config = workdir / "picky_scp.json"
        self._stderr = workdir / "picky_scp.err"
        self._script.write_text(STRICT_SCP_SOURCE)
        self._config.write_text(
            json.dumps(
                {
                    "aet": aet,
                    "port": self.port,
                    "flag": str(self.flag),
                    "log": str(self.log),
                    "statuses": statuses,
                }
            )
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self._stderr.open("wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, str(self._script), str(self._config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        try:
            wait_for_port("127.0.0.1", self.port, 30, process=self._proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(10)

    def stores(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def recover(self) -> None:
        """From now on "busy" instances are accepted."""
        self.flag.touch()


@pytest.fixture
def pushed(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Sent]]]:
    root = tmp_path / "push"
    yield root, _push_set(root)


# ------------------------------------------------------------------------------- tests


@pytest.mark.needs_dcmtk
@pytest.mark.needs_orthanc
def test_forward_to_orthanc_and_storescp_keeps_syntax_and_pixels(
    tmp_path: Path, pushed: tuple[Path, dict[str, Sent]]
) -> None:
    """Every instance reaches both peers once, in the transfer syntax it was made in."""
    root, sent = pushed
    with (
        OrthancServer(workdir=tmp_path / "orthanc", graceful_stop=False) as orthanc,
        StoreSCP(workdir=tmp_path / "storescp", extra_args=["+uf"]) as scp,
    ):
        destinations = [
            _destination("orthanc", orthanc.aet, orthanc.dicom_port),
            _destination("pacs", scp.aet, scp.port),
        ]
        with InProcessGateway(tmp_path / "gw", destinations=destinations) as gw:
            _push([root], gw, len(sent))
            for dest in ("orthanc", "pacs"):
                deliveries = _wait_settled(gw, dest, len(sent))
                not_committed = {
                    sent[uid].path.name: d
                    for uid, d in deliveries.items()
                    if d["state"] != "committed"
                }
                assert not not_committed, f"{dest}: {not_committed}"
                assert all(
                    d["attempts"] == 0 and d["last_status"] == "" for d in deliveries.values()
                )
                _wait_link_up(gw, dest)
            # The gateway itself kept every instance in its own syntax.
            kept = dict(gw.state.query("SELECT sop_instance_uid, transfer_syntax FROM instances"))
            assert kept == {uid: s.transfer_syntax for uid, s in sent.items()}

        # storescp: one file per C-STORE, so this also proves nothing was sent twice.
        received = {}
        for p in scp.received_files():
            ds = dcmread(p)
            assert str(ds.SOPInstanceUID) not in received, f"{ds.SOPInstanceUID} stored twice"
            received[str(ds.SOPInstanceUID)] = ds
        assert received.keys() == sent.keys()
        for uid, s in sent.items():
            _assert_same_instance(s, received[uid], "storescp")

        with orthanc.client() as client:
            ids = client.get("/instances").json()
            assert len(ids) == len(sent)
            in_orthanc = {}
            for oid in ids:
                ds = dcmread(BytesIO(client.get(f"/instances/{oid}/file").content))
                in_orthanc[str(ds.SOPInstanceUID)] = ds
        assert in_orthanc.keys() == sent.keys()
        for uid, s in sent.items():
            _assert_same_instance(s, in_orthanc[uid], "Orthanc")


@pytest.mark.needs_dcmtk
def test_peer_down_at_first_gets_everything_exactly_once(
    tmp_path: Path, pushed: tuple[Path, dict[str, Sent]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens on the destination port: instances wait (link down, no attempt
    counted against them); once storescp listens there, each arrives exactly once."""
    root, sent = pushed
    port = free_port()  # reserved, nothing listening yet
    with InProcessGateway(tmp_path / "gw", destinations=[_destination("pacs", "PACS", port)]) as gw:
        _push([root], gw, len(sent))
        link = wait_until(
            lambda: (lk := _link(gw, "pacs")) and lk["state"] == "down" and lk, 30, "link down"
        )
        assert "failed" in link["detail"] and link["next_attempt"] is not None, link
        deliveries = _deliveries(gw, "pacs")
        assert len(deliveries) == len(sent)
        assert all(d["state"] == PENDING and d["attempts"] == 0 for d in deliveries.values())

        # StoreSCP picks its port with peers.free_port(): make it take the reserved one.
        monkeypatch.setattr(peers, "free_port", lambda: port)
        with StoreSCP(aet="PACS", workdir=tmp_path / "storescp", extra_args=["+uf"]) as scp:
            assert scp.port == port
            deliveries = _wait_settled(gw, "pacs", len(sent))
            assert {d["state"] for d in deliveries.values()} == {COMMITTED}
            _wait_link_up(gw, "pacs")
            assert _storescp_by_uid(scp) == Counter(sent.keys())  # each exactly once
            for p in scp.received_files():
                ds = dcmread(p)
                _assert_same_instance(sent[str(ds.SOPInstanceUID)], ds, "storescp")


def _picky_workload(root: Path) -> tuple[list[Path], Path, Path, list[Path]]:
    """A CT series (one study) with a CR in it, a JPEG-LS CT in another study made from an
    uncompressed slice, and an MR study: the picky SCP takes neither CR nor MR, so the CR is
    refused within an association that goes ahead and the MR's association is refused whole
    (no presentation context accepted)."""
    ct = make_ct_series(root / "ct", 8, seed=7, matrix=64)
    plain = restamp([committed_samples()[1]], root / "jls-src", salt="jls")[0]
    ds = dcmread(plain)
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    jls = root / "jls" / "ct_jls.dcm"
    jls.parent.mkdir()
    ds.save_as(jls)
    other = root / "other"
    cr = next(p for p in committed_samples() if p.name.startswith("cr_"))
    (cr_copy,) = restamp([cr], other, salt="cr-in-ct")
    ds = dcmread(cr_copy)
    ds.StudyInstanceUID = dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    ds.save_as(cr_copy)
    mr = other / "mr_jls.dcm"
    shutil.copy(str(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")), mr)
    return ct, jls, plain, [cr_copy, mr]


@pytest.mark.needs_dcmtk
def test_refusals_retry_only_failed_instances(tmp_path: Path) -> None:
    """0xA700 (out of resources) is retried until the peer recovers, with back-off and
    without re-sending what was accepted; 0xB000 is a warning and counts as stored; 0xC000
    gives up after MAX_ATTEMPTS; SOP classes the peer refuses at negotiation fail at once
    with the reason (also when that leaves the association with no context at all); a
    JPEG-LS CT goes out decoded to a peer that takes only uncompressed syntaxes."""
    ct, jls, plain, others = _picky_workload(tmp_path / "push")
    assert all(dcmread(p, stop_before_pixels=True).SOPClassUID == CTImageStorage for p in ct)
    ct_uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct]
    busy, warned, bad, fine = ct_uids[:2], ct_uids[2], ct_uids[3], ct_uids[4:]
    jls_uid = str(dcmread(jls, stop_before_pixels=True).SOPInstanceUID)
    other_uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in others]
    statuses = {uid: "busy" for uid in busy} | {warned: "B000", bad: "C000"}
    total = len(ct_uids) + 1 + len(other_uids)

    with ScriptedSCP(tmp_path, statuses) as scp:
        dest = _destination("picky", scp.aet, scp.port)
        with InProcessGateway(tmp_path / "gw", destinations=[dest]) as gw:
            # The CT study (with the CR) first, alone, so the link state seen below is its own.
            _push([*ct, others[0]], gw, len(ct) + 1)

            def busy_retried() -> bool:
                d = _deliveries(gw, "picky")
                return all(
                    uid in d and d[uid]["attempts"] >= 2 and d[uid]["state"] == PENDING
                    for uid in busy
                )

            wait_until(busy_retried, 60, "0xA700 instances refused twice")
            d = _deliveries(gw, "picky")
            assert all(d[uid]["last_status"] == "failure 0xA700" for uid in busy), d
            # Each refused instance backs off on its own (no tight resend loop, and the rest
            # of the queue goes on); the link is up, and says why instances wait.
            link = _link(gw, "picky")
            assert link is not None and link["state"] == "up", link
            assert "0xA700" in link["detail"], link
            waiting = gw.state.query(
                "SELECT next_attempt FROM deliveries WHERE destination = 'picky' "
                "AND state = 'pending' AND last_status = 'failure 0xA700'"
            )
            assert waiting and all(r[0] is not None for r in waiting), waiting
            assert all(d[uid]["state"] == COMMITTED for uid in fine), d

            _push([jls, others[1]], gw, total)
            scp.recover()
            d = _wait_settled(gw, "picky", total, 90)
            _wait_link_up(gw, "picky")
            status = gateway_status(gw.state, 0)
        stores = scp.stores()

    per_uid = Counter(s["uid"] for s in stores)
    for uid in busy:
        assert d[uid]["state"] == COMMITTED and d[uid]["last_status"] == "", d[uid]
        # Refused attempts + the one that succeeded, as the gateway counted them.
        assert per_uid[uid] == d[uid]["attempts"] + 1, (per_uid[uid], d[uid])
        assert [s["status"] for s in stores if s["uid"] == uid][-1] == 0
    for uid in fine:
        assert per_uid[uid] == 1, "an accepted instance was sent again"
        assert d[uid] == {"state": COMMITTED, "attempts": 0, "last_status": ""}
    assert per_uid[warned] == 1
    assert d[warned] == {"state": COMMITTED, "attempts": 0, "last_status": "warning 0xB000"}
    assert per_uid[bad] == MAX_ATTEMPTS
    assert d[bad] == {"state": FAILED, "attempts": MAX_ATTEMPTS, "last_status": "failure 0xC000"}
    for uid, path in zip(other_uids, others, strict=True):
        assert per_uid[uid] == 0
        assert d[uid]["state"] == FAILED, (path.name, d[uid])
        assert d[uid]["last_status"].startswith("not accepted by peer"), d[uid]
        sop_class = UID(str(dcmread(path, stop_before_pixels=True).SOPClassUID)).name
        assert sop_class in d[uid]["last_status"], d[uid]

    # The JPEG-LS CT was decoded for this peer: uncompressed, bit-identical to its source.
    (jls_store,) = [s for s in stores if s["uid"] == jls_uid]
    assert jls_store["ts"] in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert d[jls_uid] == {"state": COMMITTED, "attempts": 0, "last_status": ""}
    assert jls_store["pixels"] == hashlib.sha256(dcmread(plain).PixelData).hexdigest()

    by_study = {s["study_uid"]: s for s in status["studies"]}
    ct_study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    assert by_study[ct_study]["state"] == "committed-with-failures"
    assert by_study[ct_study]["failed"] == 2  # the 0xC000 CT and the CR
    assert {lk["destination"]: lk["state"] for lk in status["links"]} == {"picky": "up"}


@pytest.mark.needs_dcmtk
def test_an_instance_refused_for_good_does_not_block_later_studies(tmp_path: Path) -> None:
    first = make_ct_series(tmp_path / "push" / "a", 2, seed=11, matrix=32)
    later = make_ct_series(tmp_path / "push" / "b", 2, seed=12, matrix=32)
    stuck = str(dcmread(first[0], stop_before_pixels=True).SOPInstanceUID)
    later_study = str(dcmread(later[0], stop_before_pixels=True).StudyInstanceUID)
    with ScriptedSCP(tmp_path, {stuck: "busy"}) as scp:  # never recovers
        dest = _destination("picky", scp.aet, scp.port)
        with InProcessGateway(tmp_path / "gw", destinations=[dest]) as gw:

            def attempts() -> int:
                sql = "SELECT attempts FROM deliveries WHERE sop_instance_uid = ?"
                return int(gw.state.scalar(sql, (stuck,)) or 0)

            _push(first, gw, 2)
            wait_until(lambda: attempts() >= 1, 30, "first refusal")
            _push(later, gw, 4)
            # The later study was sendable during two more back-off periods.
            wait_until(lambda: attempts() >= 3, 60, "two more refusals")
            states = gw.state.query(
                "SELECT state FROM deliveries WHERE study_uid = ?", (later_study,)
            )
            assert [r[0] for r in states] == [COMMITTED, COMMITTED]


# ------------------------------------------------------------------------------- gateway send


def _cli_send(paths: list[Path], to: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="300", TERM="dumb")  # no wrapping of the messages
    env.pop("TELERAD_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "telerad.cli", "gateway", "send", *map(str, paths), "--to", to],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.needs_dcmtk
def test_gateway_send_folder_into_storescp(
    tmp_path: Path, pushed: tuple[Path, dict[str, Sent]]
) -> None:
    root, sent = pushed
    (root / "pydicom" / "README.txt").write_text("not DICOM, must be skipped\n")
    with StoreSCP(workdir=tmp_path / "storescp", extra_args=["+uf"]) as scp:
        res = _cli_send([root], f"{scp.aet}@127.0.0.1:{scp.port}")
        out = _flat(res.stdout + res.stderr)
        assert res.returncode == 0, out[-3000:]
        assert f"sent {len(sent)} " in out and "failed 0" in out, out[-3000:]
        assert "skipped 1 non-DICOM" in out, out[-3000:]
        assert "Traceback" not in out
        assert _storescp_by_uid(scp) == Counter(sent.keys())
        for p in scp.received_files():
            ds = dcmread(p)
            _assert_same_instance(sent[str(ds.SOPInstanceUID)], ds, "storescp")


def test_gateway_send_to_a_peer_that_takes_only_some(tmp_path: Path) -> None:
    """Instances the peer refuses are listed as failed (exit 1) while the rest go through; a
    JPEG-LS CT is decoded for a peer that takes CT uncompressed only."""
    ct, jls, plain, others = _picky_workload(tmp_path / "push")
    folder = tmp_path / "send"
    folder.mkdir()
    for f in [ct[0], jls, *others]:
        shutil.copy(f, folder / f.name)
    with ScriptedSCP(tmp_path, {}) as scp:
        res = _cli_send([folder], f"{scp.aet}@127.0.0.1:{scp.port}")
        out = _flat(res.stdout + res.stderr)
        assert res.returncode == 1, out
        assert "sent 2 " in out and "failed 2" in out, out
        for other in others:
            assert f"failed {folder / other.name}" in out, out
        # Only refused SOP classes: the association carries no context at all.
        res = _cli_send([folder / others[1].name], f"{scp.aet}@127.0.0.1:{scp.port}")
        out = _flat(res.stdout + res.stderr)
        assert res.returncode == 1 and "Traceback" not in out, out
        assert "failed 1" in out and "no presentation context for 'MR Image Storage'" in out
        stores = scp.stores()
    jls_uid = str(dcmread(jls, stop_before_pixels=True).SOPInstanceUID)
    (jls_store,) = [st for st in stores if st["uid"] == jls_uid]
    assert jls_store["ts"] in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert jls_store["pixels"] == hashlib.sha256(dcmread(plain).PixelData).hexdigest()
    assert len(stores) == 2


@pytest.mark.needs_dcmtk
def test_gateway_send_refused_or_unreachable_peer(
    tmp_path: Path, pushed: tuple[Path, dict[str, Sent]]
) -> None:
    """Clear one-line errors and a non-zero exit, never a traceback."""
    root, _sent = pushed
    samples = root / "samples"
    # A peer that refuses us by policy: a telerad gateway that admits one calling AE only.
    with InProcessGateway(tmp_path / "gw", allowed_callers=["SOMEONE_ELSE"]) as gw:
        res = _cli_send([samples], f"{gw.aet}@127.0.0.1:{gw.port}")
        out = _flat(res.stdout + res.stderr)
        assert res.returncode != 0, out
        assert "Traceback" not in out, out
        assert f"association with {gw.aet}@127.0.0.1:{gw.port} rejected" in out, out
        assert "Calling AE title not recognised" in out, out
        assert gw.state.scalar("SELECT count(*) FROM instances") == 0

    # storescp --refuse: DCMTK closes the socket right after its A-ASSOCIATE-RJ, so the
    # rejection is sometimes lost in the reset and looks like an abort; either way the
    # command must fail cleanly.
    with StoreSCP(workdir=tmp_path / "storescp", extra_args=["--refuse"]) as scp:
        res = _cli_send([samples], f"{scp.aet}@127.0.0.1:{scp.port}")
        out = _flat(res.stdout + res.stderr)
        assert res.returncode != 0, out
        assert "Traceback" not in out, out
        assert f"association with {scp.aet}@127.0.0.1:{scp.port} " in out, out
        assert scp.received_files() == []

    res = _cli_send([samples], f"NOBODY@127.0.0.1:{free_port()}")
    out = _flat(res.stdout + res.stderr)
    assert res.returncode != 0 and "Traceback" not in out, out
    assert "no answer" in out, out
