"""Rendering frames for DICOMweb ``/rendered`` and ``/thumbnail``, and the render cache.

The pixel pipeline is checked on values whose display value follows from PS3.3 C.11 by
hand (ramps through known windows), on the project's committed CT and CR samples in every
transfer syntax the hub stores (each must give the very same PNG as the uncompressed file),
and against DCMTK's ``dcmj2pnm`` as an independent implementation. The cache is checked for
its cap, its LRU order across a restart, and never serving a damaged entry.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from sample_studies import committed_samples
from tests.support.peers import dcmtk_tool, require_peer
from viewer_api.rendering import (
    FrameNotFound,
    InvalidRenderParameter,
    NotRenderable,
    RenderCache,
    RenderError,
    RenderKey,
    UnsupportedMediaType,
    parse_viewport,
    parse_window,
    render,
    render_array,
    thumbnail,
)

U8 = npt.NDArray[np.uint8]


# ---------------------------------------------------------------------------- datasets


def _roundtrip(ds: Dataset, syntax: UID | None = None) -> Dataset:
    """Write and read back, as the routes will get instances: from files."""
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def _image(
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attrs: object,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(arr, photometric, bits_stored or 8 * arr.dtype.itemsize)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return _roundtrip(ds)


def _ramp(lo: int, hi: int, dtype: str = "int16", columns: int = 16) -> np.ndarray:
    """Values lo..hi (inclusive), row by row, padded with ``hi`` to a full rectangle."""
    values = np.arange(lo, hi + 1)
    rows = -(-values.size // columns)
    out = np.full(rows * columns, hi)
    out[: values.size] = values
    return out.reshape(rows, columns).astype(dtype)


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(_decode(data))


def _samples() -> dict[str, Path]:
    paths = committed_samples()
    return {
        "ct": next(p for p in paths if p.name.startswith("ct_")),
        "cr": next(p for p in paths if p.name.startswith("cr_")),
    }


def _linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out piecewise, independently of the module's clipping."""
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0, y)
    y = np.where(x > c - 0.5 + (w - 1) / 2, 255, y)
    return np.floor(y + 0.5)


# ---------------------------------------------------------------------------- VOI


def test_linear_window_maps_ramp_ends_to_black_and_white() -> None:
    ds = _image(_ramp(0, 999))
    out = render_array(ds, window=(500, 200, "LINEAR")).ravel()[:1000].astype(int)
    x = np.arange(1000)
    assert (out[x <= 400] == 0).all()  # center - width/2 and below: black
    assert (out[x >= 600] == 255).all()  # center + width/2 and above: white
    assert out[500] == 128
    assert (np.diff(out) >= 0).all()
    np.testing.assert_array_equal(out, _linear(x.astype(float), 500, 200))


def test_linear_exact_and_sigmoid_follow_ps33_formulas() -> None:
    ds = _image(_ramp(0, 999))
    x = np.arange(1000, dtype=float)
    exact = render_array(ds, window=(500, 200, "linear-exact")).ravel()[:1000]
    expected = np.floor(np.clip((x - 500) / 200 + 0.5, 0, 1) * 255 + 0.5)
    np.testing.assert_array_equal(exact, expected)
    sigmoid = render_array(ds, window=(500, 200, "SIGMOID")).ravel()[:1000]
    expected = np.floor(255 / (1 + np.exp(-4 * (x - 500) / 200)) + 0.5)
    np.testing.assert_array_equal(sigmoid, expected)
    # at centre -/+ width/2 the sigmoid is 1/(1 + e^±2): 12% and 88% of full scale
    assert (sigmoid[400], sigmoid[500], sigmoid[600]) == (30, 128, 225)


def test_rescale_slope_and_intercept_apply_before_the_window() -> None:
    stored = _ramp(0, 2047)
    ds = _image(stored, RescaleSlope="2", RescaleIntercept="-1024", RescaleType="HU")
    out = render_array(ds, window=(0, 400, "LINEAR_EXACT")).ravel()[:2048]
    hu = np.arange(2048) * 2.0 - 1024
    np.testing.assert_array_equal(out, np.floor(np.clip(hu / 400 + 0.5, 0, 1) * 255 + 0.5))
    assert out[512] == 128  # stored 512 -> 0 HU, the window centre


def test_modality_lut_sequence_replaces_rescale() -> None:
    ds = _image(_ramp(0, 255, "uint8"))
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 12])
    item.add_new("LUTData", "OW", (np.arange(256, dtype="<u2") * 16).tobytes())
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    ds = _roundtrip(ds)
    out = render_array(ds, window=(2048, 4096, "LINEAR_EXACT")).ravel()[:256]
    v = np.arange(256)
    np.testing.assert_array_equal(out, np.floor(v * 16 / 4096 * 255 + 0.5))


def test_monochrome1_is_inverted() -> None:
    pixels = _ramp(0, 4095, "uint16", columns=64)
    mono2 = _image(pixels, bits_stored=12, WindowCenter="2048", WindowWidth="4096")
    mono1 = _image(
        pixels, photometric="MONOCHROME1", bits_stored=12, WindowCenter="2048", WindowWidth="4096"
    )
    dark, light = render_array(mono2), render_array(mono1)
    np.testing.assert_array_equal(light.astype(int), 255 - dark.astype(int))
    assert light[0, 0] == 255  # stored 0 is white in MONOCHROME1
    # an explicit window is inverted too
    np.testing.assert_array_equal(
        render_array(mono1, window=(1000, 500, "LINEAR")).astype(int),
        255 - render_array(mono2, window=(1000, 500, "LINEAR")).astype(int),
    )


def test_instance_window_is_used_and_an_explicit_window_overrides_it() -> None:
    pixels = _ramp(0, 999)
    own = _image(pixels, WindowCenter=["500", "300"], WindowWidth=["200", "50"])
    bare = _image(pixels)
    # the first of several stored windows
    np.testing.assert_array_equal(
        render_array(own), render_array(bare, window=(500, 200, "LINEAR"))
    )
    explicit = render_array(own, window=(300, 50, "LINEAR"))
    np.testing.assert_array_equal(explicit, render_array(bare, window=(300, 50, "LINEAR")))
    assert not np.array_equal(explicit, render_array(own))


def test_instance_voi_lut_function_is_honoured() -> None:
    pixels = _ramp(0, 999)
    own = _image(pixels, WindowCenter="500", WindowWidth="200", VOILUTFunction="SIGMOID")
    bare = _image(pixels)
    np.testing.assert_array_equal(
        render_array(own), render_array(bare, window=(500, 200, "SIGMOID"))
    )
    assert not np.array_equal(render_array(own), render_array(bare, window=(500, 200, "LINEAR")))


def test_invalid_stored_window_falls_back_to_min_max() -> None:
    pixels = _ramp(100, 355, "uint16")
    broken = _image(pixels, WindowCenter="200", WindowWidth="0")
    out = render_array(broken).ravel()
    assert out[0] == 0 and out[255] == 255


def test_voi_lut_sequence_applies_without_a_window() -> None:
    ds = _image(_ramp(0, 255, "uint8"))
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 8])
    item.add_new("LUTData", "OW", (255 - np.arange(256, dtype="<u2")).tobytes())
    ds.VOILUTSequence = Sequence([item])
    ds = _roundtrip(ds)
    np.testing.assert_array_equal(render_array(ds).ravel()[:256], 255 - np.arange(256))
    # an explicit window still overrides the LUT
    assert render_array(ds, window=(128, 256, "LINEAR")).ravel()[0] == 0


def test_min_max_window_without_voi_ignores_pixel_padding() -> None:
    pixels = _ramp(0, 255, columns=16)
    out = render_array(_image(pixels)).ravel()
    assert out[0] == 0 and out[255] == 255
    padded = pixels.copy()
    padded[:2, :] = -2000  # outside the field of view
    ds = _image(padded, PixelPaddingValue=-2000)
    out = render_array(ds)
    assert out[2, 0] == 0 and out[-1, -1] == 255  # range 32..255 of the image itself
    assert out[0, 0] == 0


def _image_32(pixels: np.ndarray, **attrs: str) -> Dataset:
    """A 32-bit unsigned instance (pydicom's set_pixel_data stops at 16 bits)."""
    ds = _image(np.zeros(pixels.shape, dtype=np.uint16))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = pixels.astype("<u4").tobytes()
    return _roundtrip(ds)


def test_32_bit_pixels_take_the_direct_path_with_the_same_math() -> None:
    wide = _image_32(_ramp(0, 999, "uint32"), WindowCenter="500", WindowWidth="200")
    narrow = _image(_ramp(0, 999, "uint16"), WindowCenter="500", WindowWidth="200")
    np.testing.assert_array_equal(render_array(wide), render_array(narrow))
    out = render_array(_image_32(_ramp(70_000, 70_255, "uint32"))).ravel()  # min/max window
    assert out[0] == 0 and out[255] == 255


# ---------------------------------------------------------------------------- frames


def _multiframe(frames: int = 3, size: int = 16) -> tuple[Dataset, np.ndarray]:
    """Frame k (0-based) is black with a white square in column block k."""
    arr = np.zeros((frames, size, size), dtype=np.uint16)
    for k in range(frames):
        arr[k, 4:8, 4 * k : 4 * k + 4] = 1000
    return _image(arr, bits_stored=12, WindowCenter="500", WindowWidth="1000"), arr


def test_multiframe_renders_the_requested_frame() -> None:
    ds, arr = _multiframe()
    for frame in (1, 2, 3):
        out = _pixels(render(ds, frame, media_type="image/png"))
        np.testing.assert_array_equal(out, np.where(arr[frame - 1] > 0, 255, 0))
    for frame in (0, 4, -1):
        with pytest.raises(FrameNotFound, match="3 frame"):
            render(ds, frame)


def test_only_the_requested_frame_is_decoded() -> None:
    ds, arr = _multiframe()
    ds.compress(RLELossless)
    fragments = list(generate_frames(ds.PixelData, number_of_frames=3))
    fragments[2] = b"\xff" * len(fragments[2])  # frame 3 cannot be decoded
    ds.PixelData = encapsulate(fragments)
    ds = _roundtrip(ds)
    np.testing.assert_array_equal(render_array(ds, 1), np.where(arr[0] > 0, 255, 0))
    with pytest.raises(NotRenderable, match="frame 3"):
        render_array(ds, 3)


def test_enhanced_multiframe_uses_each_frames_functional_groups() -> None:
    arr = np.stack([_ramp(0, 255, "uint16"), _ramp(0, 255, "uint16")])
    ds = _image(arr, bits_stored=12)
    groups = []
    for intercept, center in ((0, 100), (-1000, -900)):
        transform = Dataset()
        transform.RescaleIntercept = str(intercept)
        transform.RescaleSlope = "1"
        transform.RescaleType = "US"
        voi = Dataset()
        voi.WindowCenter = str(center)
        voi.WindowWidth = "100"
        item = Dataset()
        item.PixelValueTransformationSequence = Sequence([transform])
        item.FrameVOILUTSequence = Sequence([voi])
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds = _roundtrip(ds)
    plain = _image(_ramp(0, 255, "uint16"), bits_stored=12)
    expected = render_array(plain, window=(100, 100, "LINEAR"))
    # frame 2: stored v -> v - 1000, window centre -900: the same picture as frame 1
    np.testing.assert_array_equal(render_array(ds, 1), expected)
    np.testing.assert_array_equal(render_array(ds, 2), expected)
    assert expected.ravel()[50] == 0 and expected.ravel()[150] == 255


# ---------------------------------------------------------------------------- colour


def _rgb_test_image(rows: int = 32, columns: int = 48) -> np.ndarray:
    """A smooth colour image whose colour repeats over pixel pairs (4:2:2 loses nothing)."""
    y, x = np.mgrid[0:rows, 0:columns]
    x = x // 2 * 2
    rgb = np.stack([x * 255 // columns, y * 255 // rows, 255 - x * 255 // columns], axis=-1)
    return rgb.astype(np.uint8)


def test_rgb_renders_as_stored() -> None:
    rgb = _rgb_test_image()
    ds = _image(rgb, photometric="RGB")
    png = _decode(render(ds, media_type="image/png"))
    assert png.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(png), rgb)


def test_16_bit_rgb_is_scaled_to_8_bits() -> None:
    rgb = _rgb_test_image()
    ds = _image(rgb.astype(np.uint16) << 4, photometric="RGB", bits_stored=12)
    np.testing.assert_array_equal(render_array(ds), rgb)


def test_ybr_full_is_converted_to_rgb() -> None:
    rgb = _rgb_test_image()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = render_array(_image(ybr, photometric="YBR_FULL"))
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 2


def test_native_ybr_full_422_is_upsampled_and_converted() -> None:
    rgb = _rgb_test_image()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    # PS3.5 8.2.1: each horizontal pair of pixels stored as Y1 Y2 Cb Cr
    pairs = ybr.reshape(ybr.shape[0], -1, 2, 3)
    packed = np.stack(
        [pairs[:, :, 0, 0], pairs[:, :, 1, 0], pairs[:, :, 0, 1], pairs[:, :, 0, 2]], axis=-1
    )
    ds = _image(rgb, photometric="RGB")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.astype(np.uint8).tobytes()
    out = render_array(_roundtrip(ds))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 2


def test_palette_color_applies_the_lut() -> None:
    indices = _ramp(0, 255, "uint8")
    ds = _image(indices, photometric="PALETTE COLOR")
    red = np.arange(256, dtype="<u2") * 257  # 16-bit entries
    green = (255 - np.arange(256, dtype="<u2")) * 257
    blue = np.full(256, 0x8000, dtype="<u2")
    for colour, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", lut.tobytes())
    out = render_array(_roundtrip(ds)).reshape(-1, 3)[:256]
    np.testing.assert_array_equal(out[:, 0], np.arange(256))
    np.testing.assert_array_equal(out[:, 1], 255 - np.arange(256))
    assert (out[:, 2] == 128).all()


# ---------------------------------------------------------------------------- transfer syntaxes

COMPRESSED = [RLELossless, JPEGLSLossless, JPEG2000Lossless]
UNCOMPRESSED = [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]


@pytest.mark.parametrize("sample", ["ct", "cr"])
@pytest.mark.parametrize("syntax", COMPRESSED + UNCOMPRESSED, ids=lambda uid: uid.keyword)
def test_each_stored_transfer_syntax_renders_the_same_png(sample: str, syntax: UID) -> None:
    original: Dataset = dcmread(_samples()[sample])
    assert original.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    reference = render(original, media_type="image/png")
    ds: Dataset = dcmread(_samples()[sample])
    if syntax in COMPRESSED:
        ds.compress(syntax, generate_instance_uid=False)
        ds = _roundtrip(ds)
    else:
        ds = _roundtrip(ds, syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert render(ds, media_type="image/png") == reference
    np.testing.assert_array_equal(
        render_array(ds, window=(40, 400, "LINEAR")),
        render_array(original, window=(40, 400, "LINEAR")),
    )


@pytest.mark.parametrize("syntax", COMPRESSED, ids=lambda uid: uid.keyword)
def test_compressed_rgb_renders_as_stored(syntax: UID) -> None:
    rgb = _rgb_test_image()
    ds = _image(rgb, photometric="RGB")
    ds.compress(syntax)
    out = render_array(_roundtrip(ds))
    np.testing.assert_array_equal(out, rgb)


def _jpeg_baseline(image: Image.Image, photometric: str) -> tuple[Dataset, np.ndarray]:
    """A JPEG baseline instance made with Pillow, and the pixels Pillow decodes from it."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85, subsampling=1)  # 1 = 4:2:2, what DICOM allows
    jpeg = buffer.getvalue()
    decoded = np.asarray(_decode(jpeg))
    ds = _image(decoded, photometric="RGB" if decoded.ndim == 3 else "MONOCHROME2")
    ds.PhotometricInterpretation = photometric
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    return _roundtrip(ds, JPEGBaseline8Bit), decoded


def test_jpeg_baseline_grayscale_decodes_to_the_same_pixels() -> None:
    gray = Image.fromarray(_ramp(0, 255, "uint8", columns=32))
    ds, decoded = _jpeg_baseline(gray, "MONOCHROME2")
    uncompressed = _image(decoded)
    assert render(ds, media_type="image/png") == render(uncompressed, media_type="image/png")


def test_jpeg_baseline_colour_decodes_to_the_same_pixels() -> None:
    ds, decoded = _jpeg_baseline(Image.fromarray(_rgb_test_image()), "YBR_FULL_422")
    # pydicom has Pillow return YCbCr and converts it itself: rounding may differ by one
    diff = np.abs(render_array(ds).astype(int) - decoded.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_transfer_syntax_without_a_permitted_decoder_is_not_renderable() -> None:
    # JPEG Lossless SV1 would need pylibjpeg-libjpeg (GPL-3, excluded) or GDCM.
    ds = _image(_ramp(0, 255, "uint16"), bits_stored=12)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds = _roundtrip(ds, JPEGLosslessSV1)
    with pytest.raises(NotRenderable):
        render(ds)


# ---------------------------------------------------------------------------- output


def test_viewport_fits_inside_keeping_aspect_ratio() -> None:
    ds = _image(np.zeros((200, 300), dtype=np.uint16), bits_stored=12)
    assert _decode(render(ds, viewport=(100, 100))).size == (100, 67)
    assert _decode(render(ds, viewport=(1000, 50))).size == (75, 50)
    assert _decode(render(ds, viewport=(600, 600), media_type="image/png")).size == (600, 400)
    assert _decode(render(ds)).size == (300, 200)
    assert _decode(thumbnail(ds)).size == (128, 85)
    assert _decode(thumbnail(ds, size=64, media_type="image/png")).size == (64, 43)


def test_downscaling_averages_rather_than_drops_pixels() -> None:
    stripes = np.zeros((64, 64), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: nearest-neighbour would give all 0 or 255
    ds = _image(stripes, WindowCenter="128", WindowWidth="256")
    small = _pixels(render(ds, media_type="image/png", viewport=(16, 16)))
    assert 100 < small.mean() < 155 and small.std() < 20


def test_output_formats_and_jpeg_quality() -> None:
    samples = _samples()
    ct = dcmread(samples["ct"])
    png = _decode(render(ct, media_type="image/png"))
    jpeg = _decode(render(ct, media_type="image/jpeg"))
    assert (png.format, png.mode, jpeg.format, jpeg.mode) == ("PNG", "L", "JPEG", "L")
    assert png.size == (ct.Columns, ct.Rows)
    assert len(render(ct, quality=20)) < len(render(ct, quality=95))
    # JPEG at 95 stays close to the lossless PNG
    diff = np.abs(np.asarray(png, dtype=int) - np.asarray(_decode(render(ct, quality=95)), int))
    assert diff.mean() < 2
    rgb = _image(_rgb_test_image(), photometric="RGB")
    assert _decode(render(rgb, media_type="image/png")).mode == "RGB"
    assert _decode(render(rgb)).mode == "RGB"
    assert render(ct, media_type="image/PNG; charset=x") == render(ct, media_type="image/png")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda ds: render(ds, 0), FrameNotFound),
        (lambda ds: render(ds, 2), FrameNotFound),
        (lambda ds: render(ds, media_type="image/gif"), UnsupportedMediaType),
        (lambda ds: render(ds, media_type="application/dicom"), UnsupportedMediaType),
        (lambda ds: render(ds, window=(40, 0, "LINEAR")), InvalidRenderParameter),
        (lambda ds: render(ds, window=(40, 0.5, "LINEAR")), InvalidRenderParameter),
        (lambda ds: render(ds, window=(40, 400, "CUBIC")), InvalidRenderParameter),
        (lambda ds: render(ds, window=(float("nan"), 400, "LINEAR")), InvalidRenderParameter),
        (lambda ds: render(ds, viewport=(0, 10)), InvalidRenderParameter),
        (lambda ds: render(ds, viewport=(10, 100_000)), InvalidRenderParameter),
        (lambda ds: render(ds, quality=0), InvalidRenderParameter),
        (lambda ds: render(ds, quality=101), InvalidRenderParameter),
    ],
)
def test_bad_requests_raise_render_errors(
    call: Callable[[Dataset], bytes], error: type[RenderError]
) -> None:
    ds = _image(_ramp(0, 99))
    with pytest.raises(error) as raised:
        call(ds)
    assert isinstance(raised.value, RenderError) and isinstance(raised.value, ValueError)
    assert str(raised.value)


def test_instance_without_pixels_is_not_renderable() -> None:
    ds = _image(_ramp(0, 99))
    del ds.PixelData
    with pytest.raises(NotRenderable, match="no pixel data"):
        render(ds)


def test_query_parameter_parsers() -> None:
    assert parse_window("40,400") == (40.0, 400.0, "LINEAR")
    assert parse_window("-600, 1500, linear-exact") == (-600.0, 1500.0, "LINEAR_EXACT")
    assert parse_window("0,1,sigmoid")[2] == "SIGMOID"
    assert parse_viewport("512,384") == (512, 384)
    for bad in ("40", "a,b", "40,0,linear", "40,400,gamma", "1,2,3,4"):
        with pytest.raises(InvalidRenderParameter):
            parse_window(bad)
    for bad in ("512", "512,0", "x,1", "512,512,0,0,10,10"):
        with pytest.raises(InvalidRenderParameter):
            parse_viewport(bad)


# ---------------------------------------------------------------------------- DCMTK


def _dcmj2pnm_png_support(tool: str) -> bool:
    proc = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    return "LIBPNG" in proc.stdout.upper()


def _dcmtk_render(path: Path, args: list[str], out: Path) -> np.ndarray:
    tool = dcmtk_tool("dcmj2pnm")
    require_peer("DCMTK dcmj2pnm", _dcmj2pnm_png_support(tool), "dcmj2pnm built without libpng")
    proc = subprocess.run(
        [tool, "+on", *args, str(path), str(out)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return np.asarray(Image.open(out))


def _dcmtk_inputs(tmp_path: Path) -> dict[str, Path]:
    inputs = dict(_samples())
    cr = dcmread(inputs["cr"])
    cr.PhotometricInterpretation = "MONOCHROME1"
    inputs["cr_mono1"] = tmp_path / "cr_mono1.dcm"
    cr.save_as(inputs["cr_mono1"], enforce_file_format=True)
    slices = [dcmread(p) for p in committed_samples() if p.name.startswith("ct_")][:3]
    multi = slices[0]
    multi.NumberOfFrames = len(slices)
    multi.PixelData = b"".join(s.PixelData for s in slices)
    inputs["ct_frames"] = tmp_path / "ct_frames.dcm"
    multi.save_as(inputs["ct_frames"], enforce_file_format=True)
    return inputs


@pytest.mark.needs_dcmtk("dcmj2pnm")
@pytest.mark.parametrize(
    ("sample", "args", "window", "frame"),
    [
        pytest.param("ct", ["+Ww", "40", "400"], (40, 400, "LINEAR"), 1, id="ct-linear"),
        pytest.param(
            "ct", ["+Ww", "-600", "1500", "+Wfs"], (-600, 1500, "SIGMOID"), 1, id="ct-sigmoid"
        ),
        pytest.param("ct", ["+Wi", "1"], None, 1, id="ct-own-window"),
        pytest.param("cr", ["+Wi", "1"], None, 1, id="cr-own-window"),
        pytest.param("cr", ["+Ww", "1000", "700"], (1000, 700, "LINEAR"), 1, id="cr-linear"),
        pytest.param(
            "cr_mono1", ["+Ww", "1900", "3200"], (1900, 3200, "LINEAR"), 1, id="mono1-linear"
        ),
        pytest.param("cr_mono1", ["+Wi", "1"], None, 1, id="mono1-own-window"),
        pytest.param(
            "ct_frames", ["+F", "3", "+Ww", "40", "400"], (40, 400, "LINEAR"), 3, id="frame-3"
        ),
    ],
)
def test_matches_dcmtk_dcmj2pnm_within_one_grey_level(
    tmp_path: Path,
    sample: str,
    args: list[str],
    window: tuple[float, float, str] | None,
    frame: int,
) -> None:
    path = _dcmtk_inputs(tmp_path)[sample]
    theirs = _dcmtk_render(path, args, tmp_path / "dcmtk.png")
    ours = _pixels(render(dcmread(path), frame, media_type="image/png", window=window))
    assert ours.shape == theirs.shape
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 1, f"max difference {diff.max()} grey levels"
    assert theirs.std() > 10  # not a blank image on both sides
    if frame > 1:  # and really another frame than the first
        first = _pixels(render(dcmread(path), 1, media_type="image/png", window=window))
        assert not np.array_equal(ours, first)


# ---------------------------------------------------------------------------- cache


def _key(n: int = 0, **changes: object) -> RenderKey:
    fields: dict[str, object] = {
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "frame": 1,
        "media_type": "image/jpeg",
        "window": None,
        "viewport": None,
        "quality": 90,
        "version": f"sha256:{n}",
    }
    fields.update(changes)
    return RenderKey(**fields)  # type: ignore[arg-type]


def _entry_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]


def test_cache_key_is_a_hash_of_every_field() -> None:
    base = _key()
    digest = base.digest()
    assert len(digest) == 64 and "1.2.826" not in digest
    assert (
        _key(window=(40, 400, "linear")).digest() == _key(window=(40.0, 400.0, "LINEAR")).digest()
    )
    variants = [
        _key(sop_instance_uid="1.2.3"),
        _key(frame=2),
        _key(media_type="image/png"),
        _key(window=(40, 400, "LINEAR")),
        _key(viewport=(128, 128)),
        _key(quality=80),
        _key(1),
    ]
    assert len({digest, *(k.digest() for k in variants)}) == len(variants) + 1


def test_cache_round_trip_and_get_or_render(tmp_path: Path) -> None:
    cache = RenderCache(tmp_path / "cache", 1_000_000)
    assert cache.get(_key()) is None
    assert cache.put(_key(), b"jpeg bytes")
    assert cache.get(_key()) == b"jpeg bytes"
    calls: list[int] = []

    def produce() -> bytes:
        calls.append(1)
        return b"rendered"

    assert cache.get_or_render(_key(1), produce) == b"rendered"
    assert cache.get_or_render(_key(1), produce) == b"rendered"
    assert len(calls) == 1
    assert not any("1.2.826" in str(p) for p in tmp_path.rglob("*"))
    stats = cache.stats()
    assert stats["entries"] == 2 and stats["hits"] == 2 and stats["misses"] == 2


def test_cache_evicts_least_recently_used_to_stay_under_its_cap(tmp_path: Path) -> None:
    payload = 1000
    probe = RenderCache(tmp_path / "probe", 10_000)
    probe.put(_key(), b"x" * payload)
    entry = probe.total_bytes  # payload + header
    cap = 3 * entry + entry // 2
    cache = RenderCache(tmp_path / "cache", cap)
    for n in range(3):
        cache.put(_key(n), bytes([n]) * payload)
    assert cache.get(_key(0)) is not None  # 0 is now the most recently used
    cache.put(_key(3), b"3" * payload)
    assert cache.get(_key(1)) is None  # the least recently used went
    assert [cache.get(_key(n)) is not None for n in (0, 2, 3)] == [True, True, True]
    assert cache.total_bytes <= cap and len(cache) == 3
    assert sum(p.stat().st_size for p in _entry_files(tmp_path / "cache")) == cache.total_bytes
    assert not cache.put(_key(9), b"y" * cap)  # bigger than the whole cache: not stored
    assert cache.total_bytes <= cap


def test_cache_reopened_counts_existing_entries_and_keeps_lru_order(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = RenderCache(directory, 1_000_000)
    for n in range(4):
        cache.put(_key(n), bytes([n]) * 500)
        stamp = time.time() - 100 + n  # distinct modification times: the recency on disk
        os.utime(cache.path_for(_key(n)), (stamp, stamp))
    reopened = RenderCache(directory, 1_000_000)
    assert (len(reopened), reopened.total_bytes) == (4, cache.total_bytes)
    smaller = RenderCache(directory, cache.total_bytes // 2)
    assert len(smaller) == 2 and smaller.total_bytes <= smaller.max_bytes
    assert [smaller.get(_key(n)) is not None for n in range(4)] == [False, False, True, True]


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[: len(blob) // 2],  # truncated
        lambda blob: bytes(len(blob)),  # renamed but never written back: zeros
        lambda blob: b"",  # empty file
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),  # one flipped bit
        lambda blob: blob + b"extra",  # longer than recorded
    ],
    ids=["truncated", "zero-filled", "empty", "bit-flip", "appended"],
)
def test_cache_never_serves_a_damaged_entry(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    cache = RenderCache(tmp_path / "cache", 1_000_000)
    cache.put(_key(), b"\x89PNG" + bytes(range(256)) * 4)
    path = cache.path_for(_key())
    path.write_bytes(damage(path.read_bytes()))
    assert cache.get(_key()) is None
    assert not path.exists() and len(cache) == 0 and cache.total_bytes == 0
    cache.put(_key(), b"fresh")
    assert cache.get(_key()) == b"fresh"


def test_cache_ignores_and_cleans_leftover_temporary_files(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = RenderCache(directory, 1_000_000)
    cache.put(_key(), b"complete")
    sub = cache.path_for(_key()).parent
    stale, young = sub / ".tmp-stale", sub / ".tmp-young"
    for temp in (stale, young):
        temp.write_bytes(b"half a ")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    reopened = RenderCache(directory, 1_000_000)
    assert len(reopened) == 1 and reopened.get(_key()) == b"complete"
    assert not stale.exists() and young.exists()  # a young one may be another put in flight


def test_cache_under_concurrent_use_keeps_its_cap_and_serves_only_whole_entries(
    tmp_path: Path,
) -> None:
    cap = 40_000
    cache = RenderCache(tmp_path / "cache", cap)
    payloads = {n: bytes([n]) * (500 + 97 * n) for n in range(40)}
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            n = rng.randrange(40)
            if rng.random() < 0.5:
                cache.put(_key(n), payloads[n])
            else:
                got = cache.get(_key(n))
                if got is not None and got != payloads[n]:
                    errors.append(f"entry {n} served {len(got)} wrong bytes")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: races show up in every run
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert cache.total_bytes <= cap
    on_disk = sum(p.stat().st_size for p in _entry_files(tmp_path / "cache"))
    assert on_disk == cache.total_bytes
    assert RenderCache(tmp_path / "cache", cap).total_bytes == on_disk
