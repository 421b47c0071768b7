"""The wire codec and bundle must give back the exact original bytes, or fail loudly.

The hub accepts an instance only when the SHA-256 of the restored bytes matches the gateway's
manifest, so every test here compares bytes, never datasets.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from telerad.core import wire
from telerad.core.wire import (
    BundleEntry,
    BundleStats,
    WireFormatError,
    decode_instance,
    describe_blob,
    encode_instance,
    read_bundle,
    write_bundle,
)

# Everything pydicom ships, read from disk: get_testdata_files() would try the network.
PYDICOM_FILES = sorted(p for p in (Path(DATA_ROOT) / "test_files").rglob("*") if p.is_file())

# pydicom warns about the odd files it is fed on purpose; that is not what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")


def make_instance(
    pixels: np.ndarray,
    *,
    bits_allocated: int,
    signed: bool = False,
    samples: int = 1,
    planar: int = 0,
    frames: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    bits_stored: int | None = None,
) -> bytes:
    """A minimal but valid Part-10 image; ``pixels`` is (frames, rows, cols[, samples])."""
    arr = np.ascontiguousarray(pixels)
    rows, columns = arr.shape[1], arr.shape[2]
    if planar and samples > 1:
        arr = np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(arr.shape), str(signed)])
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = "OT"
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = planar
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW" if bits_allocated == 16 else "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=transfer_syntax == ImplicitVRLittleEndian)
    return out.getvalue()


def ct_phantom(rng: np.random.Generator, rows: int = 512, cols: int = 512) -> np.ndarray:
    """Air, a body ellipse, bone, organs and a lesion in HU with sigma 15 quantum noise."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = np.full((rows, cols), -1000.0, dtype=np.float32)
    img[((x - cols / 2) / (0.42 * cols)) ** 2 + ((y - rows / 2) / (0.35 * rows)) ** 2 < 1] = 40
    for cx, cy, radius, value in [
        (0.35, 0.45, 0.08, 700),
        (0.62, 0.5, 0.12, 60),
        (0.5, 0.3, 0.05, -100),
        (0.45, 0.62, 0.03, 120),
    ]:
        img[(x - cx * cols) ** 2 + (y - cy * rows) ** 2 < (radius * cols) ** 2] = value
    img += rng.normal(0.0, 15.0, img.shape).astype(np.float32)
    return np.round(img).astype(np.int16)


def assert_round_trip(data: bytes) -> bytes:
    blob = encode_instance(data)
    assert decode_instance(blob) == data
    assert encode_instance(data) == blob, "encoding must be deterministic"
    return blob


@pytest.fixture(scope="module")
def ct_slice() -> bytes:
    rng = np.random.default_rng(20240501)
    return make_instance(ct_phantom(rng)[None], bits_allocated=16, signed=True, bits_stored=12)


@pytest.fixture(scope="module")
def cr_image() -> bytes:
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:2500, 0:2000].astype(np.float32)
    img = 1800 + 900 * np.sin(x / 310.0) * np.cos(y / 420.0) + rng.normal(0, 12, (2500, 2000))
    img[:, :120] = 4095  # collimated edge
    return make_instance(
        np.clip(img, 0, 4095).astype(np.uint16)[None], bits_allocated=16, bits_stored=12
    )


# --- instance codec ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", PYDICOM_FILES, ids=[str(p.relative_to(DATA_ROOT)) for p in PYDICOM_FILES]
)
def test_every_pydicom_test_file_round_trips_exactly(path: Path) -> None:
    data = path.read_bytes()
    blob = assert_round_trip(data)
    assert len(blob) <= len(data) + 24  # never worse than raw plus the blob header


def test_pydicom_test_files_cover_the_pixel_paths() -> None:
    codecs = {describe_blob(encode_instance(p.read_bytes())) for p in PYDICOM_FILES}
    assert {"zstd", "raw", "split/stored", "split/jpeg-ls", "split/zstd"} <= codecs


def test_noisy_ct_slice_compresses_below_045_and_round_trips(ct_slice: bytes) -> None:
    blob = assert_round_trip(ct_slice)
    assert describe_blob(blob) == "split/jpeg-ls"
    assert len(blob) / len(ct_slice) <= 0.45


def test_cr_2000x2500_12bit_round_trips(cr_image: bytes) -> None:
    blob = encode_instance(cr_image)
    assert decode_instance(blob) == cr_image
    assert describe_blob(blob) == "split/jpeg-ls"
    assert len(blob) / len(cr_image) < 0.5


def test_implicit_vr_little_endian_uses_jpeg_ls() -> None:
    rng = np.random.default_rng(1)
    data = make_instance(
        ct_phantom(rng, 128, 96)[None],
        bits_allocated=16,
        signed=True,
        transfer_syntax=ImplicitVRLittleEndian,
    )
    blob = assert_round_trip(data)
    assert describe_blob(blob) == "split/jpeg-ls"
    assert len(blob) < 0.6 * len(data)


@pytest.mark.parametrize("signed", [False, True])
def test_8bit_monochrome_with_odd_size_and_pad_byte(signed: bool) -> None:
    rng = np.random.default_rng(2)
    ramp = np.add.outer(np.arange(37), np.arange(51)) * 2 % 200 - (100 if signed else 0)
    img = (ramp + rng.integers(-3, 4, ramp.shape)).astype(np.int8 if signed else np.uint8)
    data = bytearray(make_instance(img[None], bits_allocated=8, signed=signed))
    assert len(img.tobytes()) % 2 == 1 and data[-1] == 0  # pydicom added the pad byte
    data[-1] = 0xAB  # non-zero padding must survive too
    blob = assert_round_trip(bytes(data))
    assert describe_blob(blob) == "split/jpeg-ls"


def test_16bit_unsigned_with_garbage_above_bits_stored() -> None:
    rng = np.random.default_rng(3)
    img = (ct_phantom(rng, 128, 160).astype(np.int32) + 1200).astype(np.uint16)  # 12-bit
    img[:40] |= 0xA000  # an overlay-like block in the unused high bits
    blob = assert_round_trip(make_instance(img[None], bits_allocated=16, bits_stored=12))
    assert describe_blob(blob) == "split/jpeg-ls"
    # Sparse random garbage defeats JPEG-LS prediction; the codec must stay exact anyway.
    img[::7, ::5] |= rng.integers(1, 16, img[::7, ::5].shape, dtype=np.uint16) << 12
    assert_round_trip(make_instance(img[None], bits_allocated=16, bits_stored=12))


@pytest.mark.parametrize(
    ("low", "high"), [(-32768, 32767), (0, 65535), (-2000, -1000), (5, 5), (0, 1)]
)
def test_16bit_extreme_and_degenerate_ranges(low: int, high: int) -> None:
    rng = np.random.default_rng(4)
    signed = low < 0
    values = rng.integers(low, high + 1, (33, 47)).astype(np.int16 if signed else np.uint16)
    values[0, 0], values[-1, -1] = low, high
    assert_round_trip(make_instance(values[None], bits_allocated=16, signed=signed))


def test_signed_data_declared_unsigned_still_exact() -> None:
    rng = np.random.default_rng(5)
    values = ct_phantom(rng, 64, 64).view(np.uint16)  # negative HU seen as huge values
    assert_round_trip(make_instance(values[None], bits_allocated=16, signed=False))


def test_multiframe_16bit_each_frame_jpeg_ls() -> None:
    rng = np.random.default_rng(6)
    frames = np.stack([ct_phantom(rng, 96, 80) for _ in range(5)])
    blob = assert_round_trip(make_instance(frames, bits_allocated=16, signed=True, frames=5))
    assert describe_blob(blob) == "split/jpeg-ls"


def test_identical_frames_pick_zstd_over_jpeg_ls() -> None:
    rng = np.random.default_rng(8)
    frame = ct_phantom(rng, 64, 64)
    data = make_instance(np.stack([frame] * 8), bits_allocated=16, signed=True, frames=8)
    blob = assert_round_trip(data)
    assert describe_blob(blob) == "split/zstd"


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_8bit_both_planar_configurations(planar: int) -> None:
    rng = np.random.default_rng(9)
    base = np.add.outer(np.arange(61), np.arange(43))[..., None] * np.array([1, 2, 3])
    rgb = ((base + rng.integers(0, 9, base.shape)) % 256).astype(np.uint8)
    data = make_instance(
        np.stack([rgb, rgb[::-1]]), bits_allocated=8, samples=3, planar=planar, frames=2
    )
    blob = assert_round_trip(data)
    assert describe_blob(blob) == "split/jpeg-ls"


def test_incompressible_pixels_are_stored_not_expanded() -> None:
    rng = np.random.default_rng(10)
    noise = rng.integers(0, 65536, (128, 128), dtype=np.uint16)
    data = make_instance(noise[None], bits_allocated=16)
    blob = assert_round_trip(data)
    assert len(blob) <= len(data) + 24


@pytest.mark.parametrize(
    "data",
    [b"", b"x", b"\0" * 132, b"\0" * 128 + b"DICM" + b"\xff" * 40, bytes(range(256)) * 50],
    ids=["empty", "one-byte", "zero-preamble", "broken-meta", "not-dicom"],
)
def test_any_bytes_round_trip(data: bytes) -> None:
    assert_round_trip(data)


def test_truncated_and_overlong_files_round_trip(ct_slice: bytes) -> None:
    for data in (ct_slice[: len(ct_slice) // 2], ct_slice[:-1], ct_slice + b"\xfe\xff\x00\xe0"):
        assert_round_trip(data)


def test_pixel_length_larger_than_geometry_keeps_the_excess() -> None:
    rng = np.random.default_rng(11)
    img = ct_phantom(rng, 32, 32)
    data = bytearray(make_instance(img[None], bits_allocated=16, signed=True))
    # Pretend the file holds 10 spare bytes after the pixels, as some modalities write.
    pos = data.index(b"\xe0\x7f\x10\x00OW\x00\x00")
    (length,) = struct.unpack_from("<I", data, pos + 8)
    struct.pack_into("<I", data, pos + 8, length + 10)
    blob = assert_round_trip(bytes(data) + bytes(range(10)))
    assert describe_blob(blob) == "split/jpeg-ls"


def test_verify_falls_back_when_the_pixel_decoder_disagrees(
    ct_slice: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = wire._decode_jpeg_ls

    def off_by_one(*args: object, **kwargs: object) -> bytes:
        good = original(*args, **kwargs)  # type: ignore[arg-type]
        return bytes([good[0] ^ 1]) + good[1:]

    monkeypatch.setattr(wire, "_decode_jpeg_ls", off_by_one)
    with pytest.raises(WireFormatError, match="CRC"):
        decode_instance(encode_instance(ct_slice))
    blob = encode_instance(ct_slice, verify=True)
    assert describe_blob(blob) == "zstd"
    assert decode_instance(blob) == ct_slice


def test_corrupted_blobs_raise_never_return_wrong_bytes(ct_slice: bytes) -> None:
    blob = encode_instance(ct_slice)
    rng = np.random.default_rng(12)
    positions = [0, 5, 8, 12, 20, 30, 60, len(blob) // 2, len(blob) - 1]
    positions += rng.integers(0, len(blob), 20).tolist()
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 0x40
        with pytest.raises(WireFormatError):
            decode_instance(bytes(damaged))
    for cut in (0, 10, 24, 100, len(blob) - 1):
        with pytest.raises(WireFormatError):
            decode_instance(blob[:cut])
    with pytest.raises(WireFormatError):
        decode_instance(blob + b"\0")


def test_wire_format_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="bad magic"):
        decode_instance(b"NOPE" + bytes(40))


# --- bundle -----------------------------------------------------------------------------------


def entry_for(data: bytes, sop_uid: str) -> BundleEntry:
    return BundleEntry(
        sop_instance_uid=sop_uid,
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


@pytest.fixture(scope="module")
def bundle_items(ct_slice: bytes) -> list[tuple[BundleEntry, bytes]]:
    picks = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmd.dcm", "rtplan.dcm"]
    files = [(Path(DATA_ROOT) / "test_files" / name).read_bytes() for name in picks]
    instances = [ct_slice, *files, b""]
    return [
        (entry_for(data, f"1.2.826.0.1.3680043.8.498.{100 + i}"), data)
        for i, data in enumerate(instances)
    ]


@pytest.fixture(scope="module")
def bundle_bytes(bundle_items: list[tuple[BundleEntry, bytes]]) -> bytes:
    out = io.BytesIO()
    write_bundle(out, bundle_items)
    return out.getvalue()


def test_bundle_round_trip_and_stats(bundle_items: list[tuple[BundleEntry, bytes]]) -> None:
    out = io.BytesIO()
    stats = write_bundle(out, bundle_items)
    raw = sum(len(data) for _, data in bundle_items)
    assert stats == BundleStats(raw_bytes=raw, wire_bytes=len(out.getvalue()), count=6)
    assert stats.ratio < 0.6
    assert list(read_bundle(io.BytesIO(out.getvalue()))) == bundle_items


def test_bundle_is_deterministic(
    bundle_items: list[tuple[BundleEntry, bytes]], bundle_bytes: bytes
) -> None:
    again = io.BytesIO()
    write_bundle(again, bundle_items)
    assert again.getvalue() == bundle_bytes


def test_empty_bundle_round_trips() -> None:
    out = io.BytesIO()
    stats = write_bundle(out, [])
    assert stats == BundleStats(raw_bytes=0, wire_bytes=len(out.getvalue()), count=0)
    assert list(read_bundle(io.BytesIO(out.getvalue()))) == []


def test_truncated_bundle_raises(bundle_bytes: bytes) -> None:
    for cut in sorted(
        {0, 3, 8, 9, 20, 100, len(bundle_bytes) // 2, len(bundle_bytes) - 20, len(bundle_bytes) - 1}
    ):
        with pytest.raises(WireFormatError):
            list(read_bundle(io.BytesIO(bundle_bytes[:cut])))


def test_truncation_at_an_entry_boundary_is_caught_by_the_trailer(
    bundle_items: list[tuple[BundleEntry, bytes]],
) -> None:
    first = io.BytesIO()
    write_bundle(first, bundle_items[:2])
    whole = io.BytesIO()
    write_bundle(whole, bundle_items)
    boundary = len(first.getvalue()) - 20  # both bundles share bytes up to the trailer
    reader = read_bundle(io.BytesIO(whole.getvalue()[:boundary]))
    assert next(reader) == bundle_items[0]
    assert next(reader) == bundle_items[1]
    with pytest.raises(WireFormatError, match="truncated"):
        next(reader)


def test_corrupted_payload_names_the_instance(
    bundle_items: list[tuple[BundleEntry, bytes]], bundle_bytes: bytes
) -> None:
    target_entry = bundle_items[1][0]
    header = target_entry.to_json()
    start = bundle_bytes.index(header) + len(header)
    for offset in (0, 30, 200, 1000):
        damaged = bytearray(bundle_bytes)
        damaged[start + offset] ^= 0x01
        with pytest.raises(WireFormatError, match=re.escape(target_entry.sop_instance_uid)):
            list(read_bundle(io.BytesIO(bytes(damaged))))


def test_corrupted_entry_header_raises(
    bundle_items: list[tuple[BundleEntry, bytes]], bundle_bytes: bytes
) -> None:
    header = bundle_items[2][0].to_json()
    pos = bundle_bytes.index(header) + header.index(b'"size":') + len(b'"size":')
    damaged = bytearray(bundle_bytes)
    damaged[pos] ^= 0x01  # flips a digit of the size
    with pytest.raises(WireFormatError, match="header corrupted"):
        list(read_bundle(io.BytesIO(bytes(damaged))))


def test_every_single_byte_flip_in_framing_is_detected(bundle_bytes: bytes) -> None:
    # Bundle head, first entry frame + header, and the trailer.
    positions = [*range(0, 60), *range(len(bundle_bytes) - 20, len(bundle_bytes))]
    for pos in positions:
        damaged = bytearray(bundle_bytes)
        damaged[pos] ^= 0x10
        with pytest.raises(WireFormatError):
            list(read_bundle(io.BytesIO(bytes(damaged))))


def test_trailing_garbage_and_foreign_files_raise(bundle_bytes: bytes) -> None:
    with pytest.raises(WireFormatError, match="after the bundle trailer"):
        list(read_bundle(io.BytesIO(bundle_bytes + b"\0")))
    with pytest.raises(WireFormatError, match="not a telerad bundle"):
        list(read_bundle(io.BytesIO(b"PK\x03\x04" + bytes(100))))


def test_write_bundle_rejects_an_instance_that_does_not_match_its_manifest(
    ct_slice: bytes,
) -> None:
    entry = entry_for(ct_slice, "1.2.826.0.1.3680043.8.498.77")
    changed = ct_slice[:-1] + bytes([ct_slice[-1] ^ 1])
    with pytest.raises(WireFormatError, match=r"1\.2\.826\.0\.1\.3680043\.8\.498\.77"):
        write_bundle(io.BytesIO(), [(entry, changed)])


@pytest.mark.parametrize(
    "fields",
    [
        {"sop_instance_uid": ""},
        {"study_instance_uid": "1" * 65},
        {"sha256": "ABC"},
        {"sha256": "A" * 64},
        {"size": -1},
    ],
)
def test_bundle_entry_validates_eagerly(fields: dict[str, object]) -> None:
    base: dict[str, object] = {
        "sop_instance_uid": "1.2.3",
        "study_instance_uid": "1.2.4",
        "sha256": "0" * 64,
        "size": 0,
    }
    with pytest.raises(ValueError):
        BundleEntry(**{**base, **fields})  # type: ignore[arg-type]
