"""The sample generator: deterministic bytes, sane DICOM, UTF-8 names, real-looking pixels.

These files feed the demo, the integration tests and the benchmarks; a silent change in any
of them (a flat image, a lost character set, a reused UID) would make those lie.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
)

from sample_studies import (
    KHMER_PATIENT,
    VIETNAMESE_PATIENT,
    committed_samples,
    generate_samples,
    make_cr,
    make_ct_series,
    restamp,
)
from sample_studies.generate import (
    COMMITTED_CR_SHAPE,
    COMMITTED_CT_MATRIX,
    COMMITTED_CT_SLICES,
    CR_STUDY_DIR,
    CT_STUDY_DIR,
    write_committed_samples,
)

CT_SLICES = 5
MAX_COMMITTED_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    calls: list[tuple[int, int]] = []
    paths = generate_samples(
        tmp_path_factory.mktemp("samples"),
        ct_slices=CT_SLICES,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (CT_SLICES + 1, CT_SLICES + 1)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    return paths


def _ct(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.parent.name == CT_STUDY_DIR]


def _cr(paths: list[Path]) -> Path:
    (cr,) = [p for p in paths if p.parent.name == CR_STUDY_DIR]
    return cr


def _hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_same_seed_gives_byte_identical_files(sample_set: list[Path], tmp_path: Path) -> None:
    again = generate_samples(tmp_path, ct_slices=CT_SLICES)
    assert [p.relative_to(tmp_path) for p in again] == [
        p.relative_to(sample_set[0].parent.parent) for p in sample_set
    ]
    for first, second in zip(sample_set, again, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_another_seed_gives_other_uids_and_pixels(tmp_path: Path) -> None:
    a = pydicom.dcmread(make_ct_series(tmp_path / "a", 2, seed=1, matrix=64)[0])
    b = pydicom.dcmread(make_ct_series(tmp_path / "b", 2, seed=2, matrix=64)[0])
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.PixelData != b.PixelData


def test_layout_one_folder_per_study(sample_set: list[Path]) -> None:
    assert all(p.is_file() for p in sample_set)
    assert [p.name for p in _ct(sample_set)] == [f"CT_{i:04d}.dcm" for i in range(1, 6)]
    assert _cr(sample_set).name == "CR_0001.dcm"
    assert len(sample_set) == CT_SLICES + 1


def test_ct_tags(sample_set: list[Path]) -> None:
    slices = [pydicom.dcmread(p) for p in _ct(sample_set)]
    for i, ds in enumerate(slices, start=1):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.SOPClassUID == CTImageStorage
        assert ds.Modality == "CT"
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 16, 15)
        assert ds.PixelRepresentation == 1
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert len(ds.PixelData) == 512 * 512 * 2
        assert ds.InstanceNumber == i
        assert ds.BodyPartExamined == "CHEST"
        assert float(ds.RescaleIntercept) == -1024.0
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        for keyword in ("AccessionNumber", "StationName", "Manufacturer", "KVP", "StudyDate"):
            assert ds.get(keyword), keyword
    assert len({ds.StudyInstanceUID for ds in slices}) == 1
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1
    assert len({ds.FrameOfReferenceUID for ds in slices}) == 1
    assert len({ds.SOPInstanceUID for ds in slices}) == CT_SLICES
    # Slices are contiguous: positions step by the slice thickness, downwards.
    z = [float(ds.ImagePositionPatient[2]) for ds in slices]
    steps = np.diff(z)
    assert np.allclose(steps, -float(slices[0].SliceThickness), atol=1e-3)


def test_cr_tags(sample_set: list[Path]) -> None:
    ds = pydicom.dcmread(_cr(sample_set))
    assert ds.SOPClassUID == ComputedRadiographyImageStorage
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.Modality == "CR"
    assert (ds.Rows, ds.Columns) == (2500, 2048)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert ds.BodyPartExamined == "CHEST"
    assert ds.ViewPosition == "PA"
    pixels = ds.pixel_array
    assert int(pixels.max()) <= 4095  # 12 bits stored: nothing spills into the high bits


def test_studies_do_not_share_uids(sample_set: list[Path]) -> None:
    ct = pydicom.dcmread(_ct(sample_set)[0])
    cr = pydicom.dcmread(_cr(sample_set))
    assert ct.StudyInstanceUID != cr.StudyInstanceUID
    assert ct.AccessionNumber != cr.AccessionNumber
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sample_set]
    assert len(set(uids)) == len(uids)
    assert all(len(u) <= 64 and u.is_valid for u in uids)


def test_utf8_names_round_trip(sample_set: list[Path]) -> None:
    ct_path, cr_path = _ct(sample_set)[0], _cr(sample_set)
    for path, patient in ((ct_path, VIETNAMESE_PATIENT), (cr_path, KHMER_PATIENT)):
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == patient.name
        # Stored as UTF-8 on disk, not as '?' replacements or another code page.
        assert patient.name.encode("utf-8") in path.read_bytes()
    ct = pydicom.dcmread(ct_path)
    assert ct.PatientName.family_name == "Nguyễn"
    assert ct.PatientName.given_name == "Thị Hồng"
    assert ct.InstitutionName.startswith("Trạm Y tế xã")
    assert "không" in ct.StudyDescription
    cr = pydicom.dcmread(cr_path)
    assert cr.PatientName.family_name == "សុខ"
    assert "ទ្រូង" in cr.StudyDescription


def test_ct_pixels_look_like_a_chest(sample_set: list[Path]) -> None:
    mid = pydicom.dcmread(_ct(sample_set)[CT_SLICES // 2])
    hu = _hu(mid)
    assert hu.std() > 200

    def share(lo: float, hi: float) -> float:
        return float(((hu >= lo) & (hu < hi)).mean())

    assert share(-1100, -950) > 0.2  # air around the body
    assert share(-920, -750) > 0.05  # lung
    assert share(-150, -40) > 0.01  # fat
    assert share(0, 100) > 0.05  # soft tissue, heart
    assert share(600, 1300) > 0.002  # bone: spine, ribs
    # Noise, not flat fills: a patch of air away from the body has sigma of 10-20 HU.
    air = hu[5:40, 5:40]
    assert 8 < air.std() < 25
    assert abs(air.mean() + 1000) < 5
    # Anatomy changes along z.
    top, bottom = (_hu(pydicom.dcmread(p)) for p in (_ct(sample_set)[0], _ct(sample_set)[-1]))
    assert np.abs(top - bottom).mean() > 50


def test_cr_pixels_look_like_a_chest(sample_set: list[Path]) -> None:
    ds = pydicom.dcmread(_cr(sample_set))
    img = ds.pixel_array.astype(np.float64)
    spacing = float(ds.PixelSpacing[1])

    def mean_at(x_mm: float, y_mm: float) -> float:
        col = round(x_mm / spacing + (ds.Columns - 1) / 2)
        row = round(y_mm / spacing)
        return float(img[row - 20 : row + 20, col - 20 : col + 20].mean())

    lung = mean_at(-90.0, 180.0)
    mediastinum = mean_at(0.0, 180.0)
    outside = mean_at(-160.0, 400.0)
    assert lung + 500 < mediastinum  # MONOCHROME2: aerated lung darker than mediastinum
    assert outside < lung  # direct exposure darkest of all
    assert img.std() > 300


def test_priority_and_study_uid_are_honoured(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    paths = make_ct_series(tmp_path, 2, seed=7, study_uid=study, priority="stat", matrix=32)
    ds = pydicom.dcmread(paths[0])
    assert ds.StudyInstanceUID == study
    assert ds.RequestedProcedurePriority == "STAT"
    cr = pydicom.dcmread(make_cr(tmp_path, seed=7, study_uid=study, rows=40, columns=32))
    assert cr.StudyInstanceUID == study
    assert cr.SeriesInstanceUID != ds.SeriesInstanceUID
    assert "RequestedProcedurePriority" not in cr
    with pytest.raises(ValueError, match="RequestedProcedurePriority"):
        make_ct_series(tmp_path / "bad", 1, seed=7, priority="whenever", matrix=32)


def test_restamp_changes_uids_consistently_and_nothing_else(
    sample_set: list[Path], tmp_path: Path
) -> None:
    first = restamp(sample_set, tmp_path / "push1", salt="push-1")
    second = restamp(sample_set, tmp_path / "push2", salt="push-2")
    again = restamp(sample_set, tmp_path / "push1-again", salt="push-1")
    assert len(first) == len(sample_set)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]

    originals = [pydicom.dcmread(p) for p in sample_set]
    for copies in (first, second):
        restamped = [pydicom.dcmread(p) for p in copies]
        old_to_new: dict[str, set[str]] = {}
        for old, new in zip(originals, restamped, strict=True):
            assert new.PixelData == old.PixelData
            assert new.file_meta.TransferSyntaxUID == old.file_meta.TransferSyntaxUID
            assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                assert new[keyword].value != old[keyword].value
                old_to_new.setdefault(old[keyword].value, set()).add(new[keyword].value)
            unchanged = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
            for elem in old:
                if elem.keyword not in unchanged:
                    assert new[elem.tag].value == elem.value, elem.keyword
        # One old UID maps to exactly one new UID: studies and series stay whole.
        assert all(len(v) == 1 for v in old_to_new.values())
        assert len({ds.StudyInstanceUID for ds in restamped}) == 2
        assert len({ds.SOPInstanceUID for ds in restamped}) == len(restamped)
    uids_1 = {pydicom.dcmread(p).SOPInstanceUID for p in first}
    uids_2 = {pydicom.dcmread(p).SOPInstanceUID for p in second}
    assert not uids_1 & uids_2


def test_restamp_keeps_compressed_pixel_bytes(tmp_path: Path) -> None:
    ds = pydicom.dcmread(committed_samples()[1])
    ds.compress(RLELossless)
    src = tmp_path / "rle.dcm"
    ds.save_as(src, enforce_file_format=True)
    (out,) = restamp([src], tmp_path / "out", salt="rle")
    new = pydicom.dcmread(out)
    assert new.file_meta.TransferSyntaxUID == RLELossless
    assert new.PixelData == pydicom.dcmread(src).PixelData
    assert new.SOPInstanceUID != ds.SOPInstanceUID


def test_committed_samples_are_valid_and_small() -> None:
    paths = committed_samples()
    assert [p.name for p in paths] == [
        "cr_chest_kh.dcm",
        *(f"ct_chest_vn_{i:04d}.dcm" for i in range(1, COMMITTED_CT_SLICES + 1)),
    ]
    assert sum(p.stat().st_size for p in paths) <= MAX_COMMITTED_BYTES
    datasets = [pydicom.dcmread(p) for p in paths]
    assert {ds.Modality for ds in datasets} == {"CT", "CR"}
    for ds in datasets:
        assert ds.pixel_array.std() > 50
    ct = [ds for ds in datasets if ds.Modality == "CT"]
    assert {(ds.Rows, ds.Columns) for ds in ct} == {(COMMITTED_CT_MATRIX,) * 2}
    (cr,) = [ds for ds in datasets if ds.Modality == "CR"]
    assert (cr.Rows, cr.Columns) == COMMITTED_CR_SHAPE
    assert (Path(paths[0]).parent.parent / "PROVENANCE.md").is_file()


def test_committed_samples_regenerate_byte_for_byte(tmp_path: Path) -> None:
    """PROVENANCE.md claims the files come from this code; check the claim."""
    regenerated = {p.name: p.read_bytes() for p in write_committed_samples(tmp_path)}
    committed = {p.name: p.read_bytes() for p in committed_samples()}
    assert regenerated.keys() == committed.keys()
    stale = [name for name in committed if committed[name] != regenerated[name]]
    assert not stale, (
        f"committed samples differ from the generator: {stale}; if the generator changed on "
        "purpose, run `python -m sample_studies.generate --committed` and update PROVENANCE.md"
    )
