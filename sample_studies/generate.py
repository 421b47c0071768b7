"""Deterministic synthetic studies for demos, tests and benchmarks.

Why synthetic: telerad must be exercised with realistic *shapes* of data (512x512 signed CT
series, a 2500x2048 12-bit chest CR, UTF-8 Vietnamese and Khmer names) without ever holding
real patient data. Why deterministic: benchmarks compare peers on identical bytes, tests
compare files byte for byte, and a bug report can name a seed instead of attaching images.

Why noisy phantoms rather than flat images: compression ratios, rendering windows and
transfer times on flat images say nothing about real studies. The phantoms have the tissue
classes a reader expects (air, lung, fat, soft tissue, bone) with Gaussian-like noise, so
lossless codecs see compressibility close to real images (see FIELD-NOTES.md).

Every random draw comes from ``numpy.random.default_rng`` seeded from the caller's seed and
a fixed per-purpose tag, and every UID is a name-based UUID (``2.25.<uuid5>``) of the seed and
the study parameters, so the same arguments produce byte-identical files on every run.

Regenerate the committed samples with ``python -m sample_studies.generate --committed``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
)

logger = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]
Progress = Callable[[int, int], None]

DEFAULT_SEED = 20261122
DEFAULT_CT_SLICES = 120

CT_STUDY_DIR = "ct_chest_vn"
CR_STUDY_DIR = "cr_chest_kh"

# RequestedProcedurePriority (0040,1003) defined terms, PS3.3 C.4.11.
PROCEDURE_PRIORITIES = frozenset({"STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW"})

# Name-based UIDs: ``2.25.`` + the integer of a UUID v5 (ISO/IEC 9834-8). pydicom's
# ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and returns a random
# UUID, and its prefixed form joins the sources without a separator (["1", "23"] and
# ["12", "3"] collide), so neither gives stable, collision-free sample UIDs.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:telerad:sample-studies")

IMPLEMENTATION_VERSION_NAME = "TELERAD_SAMPLES"

# Fixed acquisition dates: files must not depend on the day they are generated.
CT_STUDY_DATE = "20261121"
CT_STUDY_TIME = "093015"
CR_STUDY_DATE = "20261121"
CR_STUDY_TIME = "141205"

SYNTHETIC_NOTE = "SYNTHETIC PHANTOM - NOT A REAL PATIENT (telerad sample_studies)"


def sample_uid(*parts: object) -> UID:
    """A stable UID for ``parts``: same parts, same UID, on any machine and Python version."""
    name = "\x1f".join(str(p) for p in parts)
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


IMPLEMENTATION_CLASS_UID = sample_uid("implementation", IMPLEMENTATION_VERSION_NAME)


@dataclass(frozen=True, slots=True)
class SamplePatient:
    """Who a sample study belongs to; names are UTF-8 (written with ISO_IR 192)."""

    name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str


@dataclass(frozen=True, slots=True)
class SampleSite:
    """Where a sample study was acquired: the station side of telerad."""

    institution: str
    station: str
    referring_physician: str
    accession_prefix: str


VIETNAMESE_PATIENT = SamplePatient(
    name="Nguyễn^Thị Hồng",
    patient_id="VN-0001234",
    birth_date="19680314",
    sex="F",
    age="058Y",
)
KHMER_PATIENT = SamplePatient(
    name="សុខ^ដារ៉ា",
    patient_id="KH-0004567",
    birth_date="19850722",
    sex="M",
    age="041Y",
)
VIETNAMESE_SITE = SampleSite(
    institution="Trạm Y tế xã Tân Phú",
    station="TYT-TANPHU-CT1",
    referring_physician="Lê^Văn Tâm",
    accession_prefix="VN",
)
KHMER_SITE = SampleSite(
    institution="មន្ទីរពេទ្យបង្អែកខេត្តកំពត",
    station="KPT-CR1",
    referring_physician="ចាន់^សុភា",
    accession_prefix="KH",
)

CT_STUDY_DESCRIPTION = "CT ngực không tiêm thuốc cản quang"
CT_SERIES_DESCRIPTION = "Ngực trục ngang {thickness} mm"
CR_STUDY_DESCRIPTION = "XQ ទ្រូង PA (Chest PA)"
CR_SERIES_DESCRIPTION = "Chest PA"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """A DS string of at most 16 characters; pydicom's float repr can exceed the VR limit."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _accession(site: SampleSite, study_uid: str) -> str:
    """An accession number tied to the study UID, so restamped studies never share one."""
    digest = int(hashlib.sha256(study_uid.encode("ascii")).hexdigest(), 16)
    return f"{site.accession_prefix}{digest % 10**10:010d}"


def _check_seed(seed: int) -> None:
    # numpy seeds from non-negative integers only; fail in our terms, before writing anything.
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def _check_priority(priority: str | None) -> str | None:
    if priority is None:
        return None
    term = priority.strip().upper()
    if term not in PROCEDURE_PRIORITIES:
        raise ValueError(
            f"RequestedProcedurePriority must be one of {sorted(PROCEDURE_PRIORITIES)}, "
            f"got {priority!r}"
        )
    return term


def _ramp(t: float, start: float, end: float) -> float:
    """Smoothstep from 0 at ``start`` to 1 at ``end``: organs fade in along z, not pop."""
    x = min(max((t - start) / (end - start), 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def _bump(t: float, a: float, b: float, c: float, d: float) -> float:
    """Rises over [a, b], stays 1, falls over [c, d]: an organ's extent along z."""
    return _ramp(t, a, b) * (1.0 - _ramp(t, c, d))


def _smooth121(img: FloatImage) -> FloatImage:
    """Separable [1, 2, 1]/4 blur: partial-volume edges and correlated noise, in pure numpy."""
    out = img * np.float32(2.0)
    out[1:, :] += img[:-1, :]
    out[:-1, :] += img[1:, :]
    out[0, :] += img[0, :]
    out[-1, :] += img[-1, :]
    tmp = out * np.float32(2.0)
    tmp[:, 1:] += out[:, :-1]
    tmp[:, :-1] += out[:, 1:]
    tmp[:, 0] += out[:, 0]
    tmp[:, -1] += out[:, -1]
    return tmp * np.float32(1.0 / 16.0)


def _root(x: FloatImage, power: float) -> FloatImage:
    """``x ** power`` for power 0.25/0.5/0.75 using only ``sqrt``.

    IEEE ``sqrt`` is exact on every CPU, while numpy's SIMD ``power``/``exp``/``cos`` may
    differ in the last bit between machines; keeping to exact operations lets a regenerated
    sample match the committed bytes on any x86-64 or ARM host.
    """
    half = np.sqrt(x)
    if power == 0.5:
        return half
    quarter = np.sqrt(half)
    if power == 0.25:
        return quarter
    if power == 0.75:
        return half * quarter
    raise ValueError(f"unsupported power {power}")


class _Ellipse(NamedTuple):
    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0  # degrees, counter-clockwise in image x/y (mm)


@dataclass(frozen=True, slots=True)
class _Grid:
    """Pixel-centre coordinates in mm: ``xs`` along a row, ``ys`` down the columns."""

    xs: npt.NDArray[np.float32]
    ys: npt.NDArray[np.float32]

    def window(self, shape: _Ellipse) -> tuple[slice, slice] | None:
        """Rows/columns that can hold ``shape``: painting stays O(shape) instead of O(image)."""
        reach = max(shape.a, shape.b) if shape.angle else None
        rx = reach if reach is not None else shape.a
        ry = reach if reach is not None else shape.b
        c0 = int(np.searchsorted(self.xs, shape.cx - rx))
        c1 = int(np.searchsorted(self.xs, shape.cx + rx, side="right"))
        r0 = int(np.searchsorted(self.ys, shape.cy - ry))
        r1 = int(np.searchsorted(self.ys, shape.cy + ry, side="right"))
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def radius2(self, shape: _Ellipse, win: tuple[slice, slice]) -> tuple[FloatImage, FloatImage]:
        """Normalised squared radius (<= 1 inside) and the y offset, inside ``win``."""
        dx = self.xs[win[1]][None, :] - np.float32(shape.cx)
        dy = self.ys[win[0]][:, None] - np.float32(shape.cy)
        if shape.angle:
            c = np.float32(math.cos(math.radians(shape.angle)))
            s = np.float32(math.sin(math.radians(shape.angle)))
            u = dx * c + dy * s
            v = dy * c - dx * s
        else:
            u = np.broadcast_to(dx, (dy.shape[0], dx.shape[1]))
            v = np.broadcast_to(dy, (dy.shape[0], dx.shape[1]))
        r2 = (u / np.float32(shape.a)) ** 2 + (v / np.float32(shape.b)) ** 2
        return r2.astype(np.float32, copy=False), np.broadcast_to(dy, r2.shape)


def _fill(img: FloatImage, grid: _Grid, shape: _Ellipse, value: float, grad_y: float = 0.0) -> None:
    """Paint a solid ellipse (CT: each tissue is one HU level, optionally with a y gradient)."""
    if shape.a <= 0 or shape.b <= 0:
        return
    win = grid.window(shape)
    if win is None:
        return
    r2, dy = grid.radius2(shape, win)
    inside = r2 <= 1.0
    region = img[win]
    if grad_y:
        region[inside] = np.float32(value) + np.float32(grad_y) * dy[inside]
    else:
        region[inside] = np.float32(value)


def _project(
    img: FloatImage, grid: _Grid, shape: _Ellipse, weight: float, power: float = 0.5
) -> None:
    """Add the X-ray path length through an ellipsoid (CR): (1 - r^2)^power, scaled."""
    if shape.a <= 0 or shape.b <= 0:
        return
    win = grid.window(shape)
    if win is None:
        return
    r2, _ = grid.radius2(shape, win)
    img[win] += np.float32(weight) * _root(np.clip(1.0 - r2, 0.0, None), power)


def _write_atomically(ds: Dataset, path: Path) -> None:
    """Temp file + ``os.replace``: an interrupted run never leaves a half-written sample.

    The temp file is opened with ``open(..., "xb")`` rather than ``mkstemp`` so it gets the
    usual umask permissions: samples are read by other users (PACS, storescu) too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as fh:
            dcmwrite(fh, ds, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # Fixed, so files do not change bytes when pydicom's own implementation UID changes.
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _base_dataset(
    *,
    sop_class: str,
    sop_instance: str,
    patient: SamplePatient,
    site: SampleSite,
    study_uid: str,
    series_uid: str,
    accession: str,
    study_date: str,
    study_time: str,
    priority: str | None,
) -> Dataset:
    """Patient/study/equipment attributes shared by the CT and CR samples."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = study_time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.AcquisitionTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = accession
    ds.Manufacturer = "TELERAD-SYNTHETIC"
    ds.InstitutionName = site.institution
    ds.ReferringPhysicianName = site.referring_physician
    ds.StationName = site.station
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    if priority is not None:
        ds.RequestedProcedurePriority = priority
    ds.ImageComments = SYNTHETIC_NOTE
    return ds


def _pixel_data(pixels: npt.NDArray[np.int16] | npt.NDArray[np.uint16]) -> DataElement:
    """Little-endian OW bytes, whatever the host byte order."""
    return DataElement(0x7FE00010, "OW", pixels.astype(pixels.dtype.newbyteorder("<")).tobytes())


# --------------------------------------------------------------------------------------------
# CT: axial chest-to-upper-abdomen phantom
# --------------------------------------------------------------------------------------------

CT_FOV_MM = 400.0
CT_COVERAGE_MM = 300.0  # apex of the lungs to the kidneys; 120 slices -> 2.5 mm
CT_NOISE_HU = 15.0
_VESSELS_PER_LUNG = 120
_RIBS_PER_SIDE = 8


@dataclass(frozen=True, slots=True)
class _Anatomy:
    """Per-patient variation drawn once from the seed, so each seed is a different body."""

    body_a: float
    body_b: float
    body_cy: float
    lung_scale: float
    heart_scale: float
    vertebra_mm: float
    vertebra_phase: float
    rib_phase: npt.NDArray[np.float64]
    # per lung: rows of (u0, v0, du, dv, radius_mm, t_start, t_end)
    vessels: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]

    @classmethod
    def draw(cls, seed: int) -> _Anatomy:
        rng = np.random.default_rng([seed, 0xC7A])

        def vessels() -> npt.NDArray[np.float64]:
            n = _VESSELS_PER_LUNG
            angle = rng.uniform(0.0, 2.0 * math.pi, n)
            radius = np.sqrt(rng.uniform(0.0, 0.8, n))
            start = rng.uniform(0.0, 0.9, n)
            return np.column_stack(
                [
                    radius * np.array([math.cos(x) for x in angle]),
                    radius * np.array([math.sin(x) for x in angle]),
                    rng.normal(0.0, 0.6, n),
                    rng.normal(0.0, 0.6, n),
                    # larger vessels near the envelope centre, towards the hilum
                    rng.uniform(0.8, 2.2, n) + 1.5 * (radius < 0.35),
                    start,
                    start + rng.uniform(0.05, 0.4, n),
                ]
            )

        return cls(
            body_a=float(rng.uniform(150.0, 172.0)),
            body_b=float(rng.uniform(108.0, 124.0)),
            body_cy=float(rng.uniform(0.0, 10.0)),
            lung_scale=float(rng.uniform(0.92, 1.05)),
            heart_scale=float(rng.uniform(0.9, 1.1)),
            vertebra_mm=float(rng.uniform(25.0, 30.0)),
            vertebra_phase=float(rng.uniform(0.0, 1.0)),
            rib_phase=rng.uniform(0.0, 1.0, 2 * _RIBS_PER_SIDE),
            vessels=(vessels(), vessels()),
        )


def _ct_slice_hu(grid: _Grid, t: float, anat: _Anatomy) -> FloatImage:
    """Noise-free HU at normalised height ``t`` (0 = lung apex, 1 = kidneys).

    Painted back to front like a radiologist describes it: table, body wall, cavity, lungs,
    mediastinum, abdominal organs, skeleton. Coordinates are patient LPS in mm: +x is the
    patient's left (image right), +y posterior (image down).
    """
    img = np.full((grid.ys.size, grid.xs.size), -1000.0, dtype=np.float32)
    cy = anat.body_cy
    a = anat.body_a * (1.10 - 0.10 * _ramp(t, 0.0, 0.2))  # shoulders at the top
    b = anat.body_b
    back = cy + b

    # Table: carbon-fibre shells around a foam core.
    table_w = 200.0
    for y0, y1, hu in (
        (back + 6, back + 9, 250.0),
        (back + 9, back + 20, -850.0),
        (back + 20, back + 23, 250.0),
    ):
        rows = (grid.ys >= y0) & (grid.ys < y1)
        cols = np.abs(grid.xs) < table_w
        img[np.ix_(rows, cols)] = hu

    # Body wall: subcutaneous fat, muscle, then the cavity (mediastinal fat in the chest,
    # mixed soft tissue in the abdomen).
    _fill(img, grid, _Ellipse(0.0, cy, a, b), -100.0)
    _fill(img, grid, _Ellipse(0.0, cy, a - 13.0, b - 10.0), 50.0)
    cavity = 25.0 - 105.0 * _ramp(t, 0.08, 0.22) + 105.0 * _ramp(t, 0.68, 0.85)
    _fill(img, grid, _Ellipse(0.0, cy - 4.0, a - 26.0, b - 22.0), cavity)
    for side in (-1.0, 1.0):  # paraspinal muscles
        _fill(img, grid, _Ellipse(side * 34.0, back - 38.0, 26.0, 20.0), 55.0)

    # Lungs fill the cavity laterally (bounded by its contour), grow from the apices and
    # withdraw into the posterior recesses at the bases; denser posteriorly (gravity).
    cavity_shape = _Ellipse(0.0, cy - 4.0, a - 28.0, b - 24.0)
    lung_centres: list[_Ellipse] = []
    for side, (end0, end1) in ((-1.0, (0.68, 0.82)), (1.0, (0.72, 0.86))):
        s = _bump(t, 0.0, 0.28, end0, end1)
        k = s**0.6 * anat.lung_scale
        envelope = _Ellipse(side * a * 0.42, cy + 12.0 * (1.0 - s), 0.62 * a * k, 1.1 * b * k)
        lung_centres.append(envelope)
        if s <= 0.02:
            continue
        win = grid.window(envelope)
        if win is None:
            continue
        r_env, dy = grid.radius2(envelope, win)
        r_cav, _ = grid.radius2(cavity_shape, win)
        medial = (side * grid.xs[win[1]] > 5.0)[None, :]
        inside = (r_env <= 1.0) & (r_cav <= 1.0) & medial
        img[win][inside] = np.float32(-860.0) + np.float32(0.45) * dy[inside]

    # Mediastinum, heart in its fat, great vessels, airway, oesophagus.
    if t < 0.75:
        _fill(img, grid, _Ellipse(0.0, cy - 12.0, 30.0, 62.0), -70.0)
    h = _bump(t, 0.36, 0.48, 0.66, 0.76) * anat.heart_scale
    if h > 0.02:
        heart = _Ellipse(16.0, cy - 24.0, 68.0 * h, 54.0 * h, -25.0)
        _fill(img, grid, heart._replace(a=heart.a + 5.0, b=heart.b + 5.0), -85.0)
        _fill(img, grid, heart, 42.0)
    spine_y = back - 60.0
    if 0.18 <= t < 0.26:
        _fill(img, grid, _Ellipse(12.0, cy + 8.0, 14.0, 42.0, -35.0), 45.0)  # aortic arch
    if 0.25 <= t < 0.5:
        _fill(img, grid, _Ellipse(6.0, cy - 24.0, 15.0, 15.0), 45.0)  # ascending aorta
        _fill(img, grid, _Ellipse(-24.0, cy - 18.0, 9.0, 10.0), 40.0)  # superior vena cava
    if 0.3 <= t < 0.42:
        _fill(img, grid, _Ellipse(26.0, cy - 34.0, 14.0, 13.0), 42.0)  # pulmonary trunk
    if t >= 0.24:
        _fill(img, grid, _Ellipse(22.0, spine_y - 22.0, 12.0, 12.0), 45.0)  # descending aorta
    _fill(img, grid, _Ellipse(5.0, spine_y - 25.0, 7.0, 6.0), 40.0)  # oesophagus
    _fill(img, grid, _Ellipse(5.0, spine_y - 26.0, 2.0, 1.5), -900.0)
    if t < 0.33:
        _fill(img, grid, _Ellipse(0.0, cy - 24.0, 12.0, 11.0), 45.0)
        _fill(img, grid, _Ellipse(0.0, cy - 24.0, 9.0, 8.5), -1000.0)  # trachea
    elif t < 0.45:
        spread = 10.0 + 70.0 * (t - 0.33)
        for side in (-1.0, 1.0):
            _fill(img, grid, _Ellipse(side * spread, cy - 16.0, 7.5, 7.5), 45.0)
            _fill(img, grid, _Ellipse(side * spread, cy - 16.0, 5.5, 5.5), -1000.0)  # bronchi

    # Pulmonary vessels, only where a lung is.
    for lung, table in zip(lung_centres, anat.vessels, strict=True):
        if lung.a <= 5.0:
            continue
        mirror = -1.0 if lung.cx < 0 else 1.0
        live = (table[:, 5] <= t) & (t < table[:, 6])
        for u0, v0, du, dv, radius, t0, _t1 in table[live]:
            u = u0 + du * (t - t0)
            v = v0 + dv * (t - t0)
            if u * u + v * v > 0.8:
                continue
            centre_x = lung.cx + mirror * u * lung.a * 0.75
            centre_y = lung.cy + v * lung.b * 0.6
            _fill(img, grid, _Ellipse(centre_x, centre_y, radius, radius), 35.0)

    # Upper abdomen under the diaphragm: the liver dome rises into the right lung base.
    liver = _ramp(t, 0.6, 0.86)
    if liver > 0.02:
        _fill(img, grid, _Ellipse(-50.0, cy + 2.0, 100.0 * liver, 82.0 * liver, 10.0), 58.0)
    spleen = _ramp(t, 0.74, 0.9)
    if spleen > 0.02:
        _fill(img, grid, _Ellipse(88.0, back - 62.0, 28.0 * spleen, 44.0 * spleen, 30.0), 48.0)
    stomach = _bump(t, 0.72, 0.84, 0.95, 1.01)
    if stomach > 0.02:
        st = _Ellipse(48.0, cy - 30.0, 42.0 * stomach, 32.0 * stomach, 15.0)
        _fill(img, grid, st, 15.0)
        _fill(img, grid, st._replace(cy=st.cy - 0.45 * st.b, a=st.a * 0.7, b=st.b * 0.45), -950.0)
    kidney = _ramp(t, 0.88, 0.97)
    if kidney > 0.02:
        for side in (-1.0, 1.0):
            k = _Ellipse(side * 68.0, back - 58.0, 22.0 * kidney, 30.0 * kidney, side * 25.0)
            _fill(img, grid, k, 32.0)
            _fill(img, grid, k._replace(a=k.a * 0.35, b=k.b * 0.35, cx=k.cx - side * 8), -60.0)

    # Spine: vertebral bodies (cortex + cancellous bone) alternating with discs along z.
    level = (t * CT_COVERAGE_MM / anat.vertebra_mm + anat.vertebra_phase) % 1.0
    if level < 0.17:
        _fill(img, grid, _Ellipse(0.0, spine_y, 18.0, 16.0), 85.0)  # intervertebral disc
    else:
        _fill(img, grid, _Ellipse(0.0, spine_y, 18.0, 16.0), 1150.0)
        _fill(img, grid, _Ellipse(0.0, spine_y, 15.0, 13.0), 320.0)
        for side in (-1.0, 1.0):
            _fill(img, grid, _Ellipse(side * 9.0, spine_y + 33.0, 4.0, 10.0, -side * 35.0), 900.0)
            _fill(img, grid, _Ellipse(side * 25.0, spine_y + 20.0, 13.0, 4.5, side * 10.0), 850.0)
        _fill(img, grid, _Ellipse(0.0, spine_y + 42.0, 4.0, 11.0), 950.0)  # spinous process
    _fill(img, grid, _Ellipse(0.0, spine_y + 26.0, 8.0, 7.0), 15.0)  # spinal canal (CSF)

    # Ribs: cross-sections around the cage, drifting with z, with gaps between ribs.
    ribs = _bump(t, 0.02, 0.06, 0.82, 0.9)
    if ribs > 0.0:
        for i in range(2 * _RIBS_PER_SIDE):
            side = -1.0 if i < _RIBS_PER_SIDE else 1.0
            j = i % _RIBS_PER_SIDE
            phase = float(anat.rib_phase[i])
            if math.sin(2.0 * math.pi * (t * CT_COVERAGE_MM / 22.0 + phase)) < -0.35:
                continue
            theta = math.radians(
                -62.0
                + j * 124.0 / (_RIBS_PER_SIDE - 1)
                + 9.0 * math.sin(2.0 * math.pi * (4.0 * t + phase))
            )
            x = side * (a - 24.0) * math.cos(theta)
            y = cy + (b - 20.0) * math.sin(theta)
            tangent = math.degrees(math.atan2(math.cos(theta), -side * math.sin(theta)))
            rib = _Ellipse(x, y, 6.0, 3.6, tangent)
            anterior = theta < math.radians(-45.0)
            _fill(img, grid, rib, 130.0 if anterior else 1000.0)  # costal cartilage anteriorly
            if not anterior:
                _fill(img, grid, rib._replace(a=4.0, b=1.8), 300.0)
    if 0.12 <= t < 0.7:
        sternum = _Ellipse(0.0, cy - b + 24.0, 14.0, 6.0)
        _fill(img, grid, sternum, 750.0)
        _fill(img, grid, sternum._replace(a=11.0, b=3.5), 260.0)
    scap = 1.0 - _ramp(t, 0.35, 0.48)
    if scap > 0.02:
        for side in (-1.0, 1.0):
            _fill(
                img,
                grid,
                _Ellipse(side * a * 0.5, back - 30.0, 26.0 * scap, 3.5, -side * 22.0),
                800.0,
            )
    return img


def _ct_slice_pixels(grid: _Grid, t: float, anat: _Anatomy, seed: int, index: int) -> bytes:
    """Stored values (HU + 1024) with correlated noise; each slice has its own RNG stream."""
    hu = _smooth121(_ct_slice_hu(grid, t, anat))
    rng = np.random.default_rng([seed, 0xC7B, index])
    white = rng.standard_normal(hu.shape, dtype=np.float32)
    # A [1,2,1]^2 blur scales white noise std by 0.375; undo that to keep sigma in HU.
    hu += _smooth121(white) * np.float32(CT_NOISE_HU / 0.375)
    stored = np.clip(np.rint(hu), -1024.0, 3071.0).astype(np.int16) + np.int16(1024)
    return stored.astype("<i2").tobytes()


def make_ct_series(
    out: Path,
    n_slices: int,
    *,
    seed: int,
    study_uid: str | None = None,
    priority: str | None = None,
    patient: SamplePatient = VIETNAMESE_PATIENT,
    site: SampleSite = VIETNAMESE_SITE,
    accession_number: str | None = None,
    study_description: str = CT_STUDY_DESCRIPTION,
    series_number: int = 2,
    matrix: int = 512,
    file_prefix: str = "CT_",
    progress: Progress | None = None,
) -> list[Path]:
    """Write one axial CT series of ``n_slices`` files into ``out``; return them in z order.

    The slices always span the same 300 mm of anatomy (2.5 mm at the default 120), so a
    1000-slice benchmark series is a thin-slice reconstruction of the same body rather than
    a 2.5 m tall patient. Pass ``study_uid`` to add series to an existing study;
    ``priority`` sets RequestedProcedurePriority (STAT, HIGH, ROUTINE, MEDIUM, LOW), which
    telerad's default priority rules read. ``matrix`` shrinks the image for small samples.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}")
    if matrix < 16:
        raise ValueError(f"matrix must be at least 16 pixels, got {matrix}")
    _check_seed(seed)
    term = _check_priority(priority)
    if study_uid is None:
        study_uid = sample_uid("ct-study", seed, n_slices, matrix)
    series_uid = sample_uid("ct-series", seed, study_uid, series_number, n_slices, matrix)
    frame_uid = sample_uid("ct-frame", seed, study_uid)
    accession = accession_number or _accession(site, study_uid)

    spacing_xy = CT_FOV_MM / matrix
    centres = (np.arange(matrix, dtype=np.float32) - np.float32((matrix - 1) / 2)) * np.float32(
        spacing_xy
    )
    grid = _Grid(xs=centres, ys=centres)
    spacing_z = CT_COVERAGE_MM / n_slices
    anat = _Anatomy.draw(seed)
    width = max(4, len(str(n_slices)))
    out.mkdir(parents=True, exist_ok=True)
    logger.info("writing CT series %s (%d slices) to %s", series_uid, n_slices, out)

    paths: list[Path] = []
    for index in range(n_slices):
        t = (index + 0.5) / n_slices
        z = -index * spacing_z
        sop_uid = sample_uid("ct-instance", series_uid, index)
        ds = _base_dataset(
            sop_class=CTImageStorage,
            sop_instance=sop_uid,
            patient=patient,
            site=site,
            study_uid=study_uid,
            series_uid=series_uid,
            accession=accession,
            study_date=CT_STUDY_DATE,
            study_time=CT_STUDY_TIME,
            priority=term,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.StudyDescription = study_description
        ds.SeriesDescription = CT_SERIES_DESCRIPTION.format(thickness=_ds(spacing_z))
        ds.ManufacturerModelName = "PhantomCT"
        ds.SoftwareVersions = "telerad-samples-1"
        ds.BodyPartExamined = "CHEST"
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = _ds(spacing_z)
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(CT_FOV_MM)
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "160"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "750"
        ds.XRayTubeCurrent = "220"
        ds.Exposure = "165"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [_ds(float(centres[0])), _ds(float(centres[0])), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = matrix
        ds.Columns = matrix
        ds.PixelSpacing = [_ds(spacing_xy), _ds(spacing_xy)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds["PixelData"] = DataElement(
            0x7FE00010, "OW", _ct_slice_pixels(grid, t, anat, seed, index)
        )
        path = out / f"{file_prefix}{index + 1:0{width}d}.dcm"
        _write_atomically(ds, path)
        paths.append(path)
        if progress is not None:
            progress(index + 1, n_slices)
    return paths


# --------------------------------------------------------------------------------------------
# CR: PA chest radiograph phantom
# --------------------------------------------------------------------------------------------

CR_WIDTH_MM = 350.208  # 2048 x 0.171 mm: a 35 x 43 cm cassette
CR_ROWS = 2500
CR_COLUMNS = 2048


def _upsample(field: FloatImage, rows: int, cols: int) -> FloatImage:
    """Bilinear resize by gathers (no BLAS): a smooth texture at a fraction of the cost."""

    def axis(n_out: int, n_in: int) -> tuple[npt.NDArray[np.intp], FloatImage]:
        pos = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float32)
        i0 = np.minimum(pos.astype(np.intp), n_in - 2)
        return i0, (pos - i0.astype(np.float32)).astype(np.float32)

    r0, fr = axis(rows, field.shape[0])
    c0, fc = axis(cols, field.shape[1])
    tmp = field[r0, :] * (1.0 - fr)[:, None] + field[r0 + 1, :] * fr[:, None]
    return (tmp[:, c0] * (1.0 - fc)[None, :] + tmp[:, c0 + 1] * fc[None, :]).astype(np.float32)


def _cr_pixels(rows: int, cols: int, spacing: float, seed: int) -> npt.NDArray[np.uint16]:
    """12-bit MONOCHROME2 values: bright where the beam was attenuated (bone, mediastinum)."""
    rng = np.random.default_rng([seed, 0xC2])
    xs = (np.arange(cols, dtype=np.float32) - np.float32((cols - 1) / 2)) * np.float32(spacing)
    ys = (np.arange(rows, dtype=np.float32) + np.float32(0.5)) * np.float32(spacing)
    grid = _Grid(xs=xs, ys=ys)
    img = np.full((rows, cols), 260.0, dtype=np.float32)  # direct exposure

    tilt = float(rng.uniform(-2.0, 2.0))
    width = float(rng.uniform(150.0, 168.0))
    # Soft tissue: torso, neck, shoulders and arms.
    _project(img, grid, _Ellipse(0.0, 270.0, width, 310.0, tilt), 1650.0, 0.25)
    _project(img, grid, _Ellipse(0.0, 10.0, 55.0, 90.0), 1100.0, 0.5)
    for side in (-1.0, 1.0):
        _project(
            img, grid, _Ellipse(side * (width + 12.0), 90.0, 48.0, 150.0, side * 12.0), 1250.0, 0.5
        )
        _project(img, grid, _Ellipse(side * (width - 2.0), 58.0, 26.0, 26.0), 420.0, 0.5)  # humerus

    # Lungs (air removes attenuation): a tall ellipse per side cut by the diaphragm dome,
    # which is highest mid-lung and falls into the costophrenic and cardiophrenic angles.
    lungs = np.zeros_like(img)
    right_dome = float(rng.uniform(300.0, 312.0))
    for side, dome in ((-1.0, right_dome), (1.0, right_dome + 14.0)):
        shape = _Ellipse(side * 80.0, 205.0, 70.0, 170.0, side * 3.0)
        win = grid.window(shape)
        if win is None:
            continue
        r2, _ = grid.radius2(shape, win)
        dx = grid.xs[win[1]][None, :] - np.float32(side * 82.0)
        diaphragm = np.float32(dome) + np.float32(0.009) * dx**2
        below = (grid.ys[win[0]][:, None] - diaphragm) / np.float32(6.0)
        cut = np.clip(0.5 - below, 0.0, 1.0)
        lungs[win] = np.maximum(lungs[win], _root(np.clip(1.0 - r2, 0.0, None), 0.25) * cut)
    # Vascular markings: smooth texture, strongest near the hila.
    coarse = rng.standard_normal((rows // 24 + 2, cols // 24 + 2), dtype=np.float32)
    fine = rng.standard_normal((rows // 8 + 2, cols // 8 + 2), dtype=np.float32)
    texture = _upsample(coarse, rows, cols) * np.float32(0.6) + _upsample(fine, rows, cols)
    near2 = np.minimum(
        (xs[None, :] + np.float32(55.0)) ** 2 + (ys[:, None] - np.float32(200.0)) ** 2,
        (xs[None, :] - np.float32(55.0)) ** 2 + (ys[:, None] - np.float32(205.0)) ** 2,
    )
    hilum = np.float32(1.0) / (np.float32(1.0) + near2 / np.float32(80.0**2))
    img -= lungs * (np.float32(1050.0) - np.float32(130.0) * texture * (0.4 + hilum))

    # Mediastinum, heart (left-sided), aortic knob, spine with vertebral rhythm, trachea.
    _project(img, grid, _Ellipse(0.0, 150.0, 34.0, 170.0), 650.0, 0.5)
    _project(img, grid, _Ellipse(24.0, 262.0, 92.0, 66.0, -18.0), 900.0, 0.25)
    _project(img, grid, _Ellipse(30.0, 128.0, 22.0, 20.0), 380.0, 0.5)
    _project(img, grid, _Ellipse(-12.0, 470.0, 170.0, 160.0), 450.0, 0.5)  # abdomen / liver
    spine = _root(np.clip(1.0 - (xs / np.float32(22.0)) ** 2, 0.0, None), 0.5)
    rhythm = np.array([0.85 + 0.15 * math.cos(2.0 * math.pi * y / 27.0) for y in ys], np.float32)
    img += np.float32(520.0) * spine[None, :] * rhythm[:, None]
    trachea_rows = ys < 170.0
    trachea = _root(np.clip(1.0 - (xs / np.float32(9.0)) ** 2, 0.0, None), 0.5)
    img[trachea_rows, :] -= np.float32(300.0) * trachea[None, :]

    # Ribs: all posterior ribs share one curve shifted by a fixed pitch, and so do the
    # anterior ones; a periodic function of the offset draws every rib in one pass.
    ax = np.abs(xs)[None, :]
    cage_shape = _Ellipse(0.0, 195.0, width - 8.0, 190.0)
    cage = np.zeros_like(img)
    win = grid.window(cage_shape)
    if win is not None:
        r2, _ = grid.radius2(cage_shape, win)
        cage[win] = np.clip((1.0 - r2) * 8.0, 0.0, 1.0)
    cage *= (ax > 16.0).astype(np.float32)
    post = (ys[:, None] - np.float32(0.0042) * (ax - 18.0) ** 2 - np.float32(42.0)) / 26.0
    frac = post - np.floor(post)
    band = np.clip(1.0 - np.abs(frac - 0.19) / 0.19, 0.0, 1.0)
    rib_profile = np.float32(0.55) + np.float32(0.45) * (1.0 - band) ** 2  # bright cortex
    ribs = (band > 0.0) * rib_profile * (post >= 0.0) * (post < 10.0)
    ant = (ys[:, None] - np.float32(0.42) * (np.float32(150.0) - ax) - np.float32(52.0)) / 26.0
    afrac = ant - np.floor(ant)
    aband = np.clip(1.0 - np.abs(afrac - 0.15) / 0.15, 0.0, 1.0)
    ribs = ribs * np.float32(330.0) + (
        (aband > 0.0) * (ant >= 0.0) * (ant < 6.0) * (ax > 40.0) * np.float32(150.0) * aband
    )
    img += ribs.astype(np.float32) * cage
    clav = np.clip(
        1.0
        - np.abs(ys[:, None] - (np.float32(64.0) - np.float32(0.2) * (ax - 15.0)))
        / np.float32(7.0),
        0.0,
        1.0,
    ) * ((ax > 12.0) & (ax < 150.0))
    img += np.float32(380.0) * _root(clav.astype(np.float32), 0.5)

    # Heel effect, quantum noise, collimator edges (unexposed: bright after processing).
    img *= (np.float32(1.04) - np.float32(0.08) * ys / np.float32(ys[-1]))[:, None]
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    img += _smooth121(noise) * np.float32(22.0 / 0.375)
    edge_r = max(1, round(6.0 / spacing))
    edge_c = max(1, round(4.0 / spacing))
    for region in (img[:edge_r, :], img[-edge_r:, :], img[:, :edge_c], img[:, -edge_c:]):
        region *= np.float32(0.15)
        region += np.float32(3400.0)
    return np.clip(np.rint(img), 0.0, 4095.0).astype(np.uint16)


def make_cr(
    out: Path,
    *,
    seed: int,
    study_uid: str | None = None,
    priority: str | None = None,
    patient: SamplePatient = KHMER_PATIENT,
    site: SampleSite = KHMER_SITE,
    accession_number: str | None = None,
    study_description: str = CR_STUDY_DESCRIPTION,
    rows: int = CR_ROWS,
    columns: int = CR_COLUMNS,
    filename: str = "CR_0001.dcm",
) -> Path:
    """Write one PA chest CR (12 bits stored in 16) into ``out`` and return its path.

    ``rows``/``columns`` shrink the image for small samples; the field of view stays a
    35 cm wide cassette, so a smaller image is a coarser one of the same chest.
    """
    if rows < 16 or columns < 16:
        raise ValueError(f"CR image must be at least 16x16 pixels, got {rows}x{columns}")
    _check_seed(seed)
    term = _check_priority(priority)
    if study_uid is None:
        study_uid = sample_uid("cr-study", seed, rows, columns)
    series_uid = sample_uid("cr-series", seed, study_uid, rows, columns)
    sop_uid = sample_uid("cr-instance", series_uid, 0)
    spacing = CR_WIDTH_MM / columns

    ds = _base_dataset(
        sop_class=ComputedRadiographyImageStorage,
        sop_instance=sop_uid,
        patient=patient,
        site=site,
        study_uid=study_uid,
        series_uid=series_uid,
        accession=accession_number or _accession(site, study_uid),
        study_date=CR_STUDY_DATE,
        study_time=CR_STUDY_TIME,
        priority=term,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Modality = "CR"
    ds.StudyDescription = study_description
    ds.SeriesDescription = CR_SERIES_DESCRIPTION
    ds.ManufacturerModelName = "PhantomCR"
    ds.SoftwareVersions = "telerad-samples-1"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.KVP = "125"
    ds.DistanceSourceToDetector = "1800"
    ds.ExposureTime = "8"
    ds.XRayTubeCurrent = "320"
    ds.Exposure = "3"
    ds.ImagerPixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "1900"
    ds.WindowWidth = "3200"
    ds["PixelData"] = _pixel_data(_cr_pixels(rows, columns, spacing, seed))
    path = out / filename
    logger.info("writing CR %s to %s", sop_uid, path)
    _write_atomically(ds, path)
    return path


# --------------------------------------------------------------------------------------------
# Sample sets, restamping, committed files
# --------------------------------------------------------------------------------------------


def generate_samples(
    out: Path,
    *,
    ct_slices: int = DEFAULT_CT_SLICES,
    seed: int = DEFAULT_SEED,
    progress: Progress | None = None,
) -> list[Path]:
    """Write the demo set: a Vietnamese CT chest and a Khmer chest CR, one folder per study.

    ``progress(done, total)`` is called after every file so a CLI can draw a bar. Files
    already in ``out`` with the same names are replaced; nothing else is touched.
    """
    total = ct_slices + 1

    def ct_progress(done: int, _n: int) -> None:
        if progress is not None:
            progress(done, total)

    paths = make_ct_series(out / CT_STUDY_DIR, ct_slices, seed=seed, progress=ct_progress)
    paths.append(make_cr(out / CR_STUDY_DIR, seed=seed))
    if progress is not None:
        progress(total, total)
    return paths


_RESTAMPED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def restamp(src_paths: Iterable[Path], out_dir: Path, *, salt: str) -> list[Path]:
    """Copy DICOM files with fresh Study/Series/SOP Instance UIDs; change nothing else.

    Why: a benchmark that pushes the same files twice measures de-duplication, not ingest.
    The new UID is a function of ``(salt, old UID)``, so files of one study stay one study
    (and one series stays one series) within a call and across calls with the same salt,
    while another salt gives another study. Pixel data and every other element, including
    the transfer syntax, are written back as read (FrameOfReferenceUID and UIDs inside
    sequences are not references this tool can remap safely, so they stay). Files are named
    ``<new SOPInstanceUID>.dcm``; the list follows the order of ``src_paths``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for src in src_paths:
        ds = dcmread(src)
        if "SOPInstanceUID" not in ds:
            raise ValueError(f"{src}: no SOP Instance UID, not a composite instance")
        for keyword in _RESTAMPED:
            old = ds.get(keyword)
            if old:
                setattr(ds, keyword, sample_uid("restamp", salt, str(old)))
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        _write_atomically(ds, path)
        written.append(path)
    return written


COMMITTED_DIR = Path(__file__).resolve().parent / "files"
COMMITTED_CT_SLICES = 4
COMMITTED_CT_MATRIX = 128
COMMITTED_CR_SHAPE = (312, 256)


def committed_samples() -> list[Path]:
    """The small samples shipped with the package (see PROVENANCE.md), sorted by name."""
    return sorted(COMMITTED_DIR.glob("*.dcm"))


def write_committed_samples(out: Path = COMMITTED_DIR, *, seed: int = DEFAULT_SEED) -> list[Path]:
    """Regenerate the committed samples: 4 CT slices at 128x128 and one 312x256 CR."""
    paths = make_ct_series(
        out, COMMITTED_CT_SLICES, seed=seed, matrix=COMMITTED_CT_MATRIX, file_prefix="ct_chest_vn_"
    )
    rows, columns = COMMITTED_CR_SHAPE
    paths.append(make_cr(out, seed=seed, rows=rows, columns=columns, filename="cr_chest_kh.dcm"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Developer entry point; the user-facing command is ``telerad samples generate``."""
    parser = argparse.ArgumentParser(
        prog="python -m sample_studies.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", nargs="?", type=Path, help="output folder")
    parser.add_argument("--ct-slices", type=int, default=DEFAULT_CT_SLICES)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--committed", action="store_true", help="rewrite the small samples in sample_studies/files"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.committed:
        paths = write_committed_samples(args.out or COMMITTED_DIR, seed=args.seed)
    elif args.out is None:
        parser.error("give an output folder, or --committed")
    else:
        paths = generate_samples(args.out, ct_slices=args.ct_slices, seed=args.seed)
    size = sum(p.stat().st_size for p in paths)
    print(
        f"wrote {len(paths)} files, {size / 1e6:.1f} MB, in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
