"""DCMTK storescu -> station gateway -> hub archive, compared file by file with the originals.

The gateway must accept at least every file DCMTK ``storescp`` accepts, keep each instance in
the transfer syntax it was made in, and the hub must end up with identical attributes and
identical pixels; where nothing was transcoded the dataset bytes are identical too.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from sample_studies.generate import generate_samples
from tests.support.peers import StoreSCP, storescu
from tests.support.telerad_procs import InProcessGateway, InProcessHub, wait_until


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta: what a transcoding would change."""
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    meta_len = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[128 + 4 + 12 + meta_len :]


def _pydicom_test_files() -> list[Path]:
    root = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
    files = []
    for f in sorted(root.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        if "SOPInstanceUID" in ds and "StudyInstanceUID" in ds and "SOPClassUID" in ds:
            files.append(f)
    return files


def _unique_by_sop(files: list[Path]) -> list[Path]:
    """pydicom ships several files sharing a SOP Instance UID (MR_small*): send one of each,
    since a second, different file under the same UID is rightly quarantined as a conflict."""
    seen: set[str] = set()
    out = []
    for f in files:
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            out.append(f)
    return out


def _accepted_by_storescp(files: list[Path], tmp: Path) -> dict[Path, Path]:
    """The reference: the files DCMTK storescu sends and storescp stores, mapped to what a
    bit-preserving storescp wrote (storescu recalculates group lengths on the wire, so the
    received bytes, not the original file, are what the gateway must keep exactly)."""
    accepted: dict[Path, Path] = {}
    with StoreSCP(workdir=tmp / "storescp", bit_preserving=True) as scp:
        for f in files:
            before = set(scp.received_files())
            storescu([f], "127.0.0.1", scp.port, scp.aet)
            new = set(scp.received_files()) - before
            if new:
                accepted[f] = new.pop()
    return accepted


def _hub_files(hub: InProcessHub) -> dict[str, Path]:
    root = hub.settings.data_dir / "archive"
    return {p.stem: p for p in root.rglob("*.dcm")}


def _compare(original: Path, reference: Path | None, arrived: Path) -> None:
    a = dcmread(original)
    b = dcmread(arrived)
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID, original.name
    for elem in a:
        # Pixels are compared below; DCMTK storescu recalculates group lengths and drops
        # trailing padding on the wire (the reference bytes check covers what it sent).
        if elem.tag in (0x7FE00010, 0xFFFCFFFC) or elem.tag.element == 0x0000:
            continue
        assert elem.tag in b, f"{original.name}: {elem.keyword or elem.tag} lost"
        assert b[elem.tag].value == elem.value, f"{original.name}: {elem.keyword} changed"
    if reference is not None:
        assert _dataset_bytes(reference) == _dataset_bytes(arrived), f"{original.name} changed"
    if "PixelData" in a:
        assert b.PixelData == a.PixelData, f"{original.name}: pixel data bytes differ"


@pytest.mark.needs_dcmtk
def test_storescu_to_hub_identical(tmp_path: Path) -> None:
    samples = generate_samples(tmp_path / "samples", ct_slices=12)
    candidates = _unique_by_sop(_pydicom_test_files())
    accepted = _accepted_by_storescp(candidates, tmp_path)
    assert len(accepted) > 30, "storescp accepted suspiciously few pydicom test files"
    push = tmp_path / "push"
    for i, f in enumerate(accepted):
        (push / "pydicom").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, push / "pydicom" / f"{i:03d}_{f.name}")
    shutil.copytree(tmp_path / "samples", push / "samples")

    with InProcessHub(tmp_path / "hub") as hub:
        token = hub.add_station("tram-1")
        with InProcessGateway(tmp_path / "gw", hub_url=hub.url, token=token) as gw:
            for folder in ("samples", "pydicom"):
                res = storescu([push / folder], "127.0.0.1", gw.port, gw.aet, "MODALITY")
                assert res.returncode == 0, res.stderr[-3000:]
            sent = sorted(push.rglob("*.dcm")) + sorted(
                p for p in (push / "pydicom").iterdir() if p.suffix != ".dcm"
            )
            by_study = Counter(
                str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in sent
            )
            wait_until(
                lambda: all(hub.committed().get(uid) == n for uid, n in by_study.items()),
                180,
                f"all {len(sent)} instances committed at the hub",
                poll_s=0.25,
            )
            quarantined = gw.state.scalar("SELECT count(*) FROM quarantine")
            assert quarantined == 0
        arrived = _hub_files(hub)
        reference = {
            str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): ref
            for f, ref in accepted.items()
        }
        for original in sent:
            uid = str(dcmread(original, stop_before_pixels=True).SOPInstanceUID)
            assert uid in arrived, f"{original.name} missing at the hub"
            _compare(original, reference.get(uid), arrived[uid])

    # Vietnamese and Khmer names survive the whole path.
    names = {str(dcmread(arrived[str(dcmread(p).SOPInstanceUID)]).PatientName) for p in samples}
    assert any("Nguyễn" in n for n in names), names
    assert any(any("\u1780" <= ch <= "\u17ff" for ch in n) for n in names), names
