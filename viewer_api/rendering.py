"""Server-side rendering of one DICOM frame to JPEG or PNG, for DICOMweb ``/rendered`` and
``/thumbnail`` (PS3.18 §8.3.5, §9.5), plus an on-disk cache of the results.

Why on the server: a reader at a remote station opening a worklist wants thumbnails and
key images now, over a thin link, before the viewer has fetched any frames; a 512×512 CT is
~0.5 MB of pixel data but a ~30 KB JPEG.

The grayscale pipeline is the one PS3.3 C.11 prescribes (and DCMTK implements): stored
value → Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence, per frame for
enhanced multi-frame objects) → VOI (a window from the request, else the instance's own
window, else its VOI LUT, else the frame's min/max) → MONOCHROME1 inversion → 8 bits. It is
evaluated once over every value the stored pixel type can hold (at most 65,536 for 16-bit
data) to build a lookup table, and the frame is then mapped in one ``numpy.take``: the cost
per pixel is one table look-up whatever the window function is.

Only the requested frame is decoded (``Decoder.as_array(index=...)``), so frame 40 of a
300-frame XA never costs 300 decodes. Decoders come from pydicom's plugin registry: pyjpegls
(JPEG-LS), pylibjpeg-openjpeg or Pillow (JPEG 2000), pydicom/pylibjpeg-rle (RLE), Pillow (JPEG
baseline/extended 8-bit). JPEG Lossless (process 14) would need pylibjpeg-libjpeg, which is
GPL-3 and deliberately not used, or GDCM: such instances raise :class:`NotRenderable`.

Everything here is pure (no HTTP, no globals): the routes turn :class:`RenderError`
subclasses into status codes (``FrameNotFound`` 404, ``UnsupportedMediaType`` 406,
``InvalidRenderParameter`` 400, ``NotRenderable`` 406/422 as they see fit).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, as_pixel_options, convert_color_space, get_decoder
from pydicom.uid import UID

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_VIEWPORT",
    "RENDERER_VERSION",
    "SUPPORTED_MEDIA_TYPES",
    "FrameNotFound",
    "InvalidRenderParameter",
    "NotRenderable",
    "RenderCache",
    "RenderError",
    "RenderKey",
    "UnsupportedMediaType",
    "VOIFunction",
    "parse_viewport",
    "parse_window",
    "render",
    "render_array",
    "thumbnail",
]

#: Bumped whenever the pixels ``render`` produces for the same inputs change: it is part of
#: every cache key, so a deployment with a fixed pipeline never serves the old images.
RENDERER_VERSION: Final = 1

SUPPORTED_MEDIA_TYPES: Final = ("image/jpeg", "image/png")
_PIL_FORMATS: Final = {"image/jpeg": "JPEG", "image/png": "PNG"}

#: Largest viewport side accepted: a request for a 100,000-pixel-wide image is an attack or a
#: typo, and would make the server allocate gigabytes.
MAX_VIEWPORT: Final = 8192

#: zlib level for PNG. Level 1 encodes a 512x512 CT ~3x faster than Pillow's default 6 for a
#: file ~10% larger (benchmarks/rendered.py); rendered PNGs are re-fetched rarely (cached).
PNG_COMPRESS_LEVEL: Final = 1

_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GRAYSCALE: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
# After decoding: pydicom converts YBR_FULL(_422) to RGB; JPEG 2000 decoders undo the
# ICT/RCT component transform themselves, so those arrive as RGB too.
_RGB_LIKE: Final = frozenset({"RGB", "YBR_ICT", "YBR_RCT"})
_YBR: Final = frozenset({"YBR_FULL", "YBR_FULL_422"})
_LOOKUP_PIXELS: Final = 1 << 16


# ---------------------------------------------------------------------------- errors


class RenderError(ValueError):
    """A frame cannot be rendered as asked; the message says why in DICOM terms."""


class FrameNotFound(RenderError):
    """The frame number is not in 1..NumberOfFrames (DICOMweb frames are 1-based)."""


class UnsupportedMediaType(RenderError):
    """The requested media type is not one :data:`SUPPORTED_MEDIA_TYPES` can produce."""


class InvalidRenderParameter(RenderError):
    """A window, viewport or quality value outside what PS3.18 allows."""


class NotRenderable(RenderError):
    """The instance has no displayable pixel data here: no pixels, an unknown photometric
    interpretation, no installed decoder for its transfer syntax, or corrupt pixel data."""


# ---------------------------------------------------------------------------- parameters


class VOIFunction(StrEnum):
    """VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3; PS3.18 spells them lower case with a
    hyphen (``linear-exact``), which :func:`parse_window` accepts too."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"

    @classmethod
    def parse(cls, text: str) -> VOIFunction:
        name = text.strip().upper().replace("-", "_")
        try:
            return cls(name)
        except ValueError:
            allowed = ", ".join(f.value for f in cls)
            raise InvalidRenderParameter(
                f"unknown VOI LUT function {text!r}; expected one of {allowed}"
            ) from None


@dataclass(frozen=True, slots=True)
class _Window:
    center: float
    width: float
    function: VOIFunction


def _check_window(center: float, width: float, function: VOIFunction) -> _Window:
    if not (math.isfinite(center) and math.isfinite(width)):
        raise InvalidRenderParameter(f"window center/width must be finite, got {center}/{width}")
    # PS3.3 C.11.2.1.2: LINEAR needs width >= 1, LINEAR_EXACT and SIGMOID width > 0.
    if function is VOIFunction.LINEAR and width < 1:
        raise InvalidRenderParameter(f"window width must be >= 1 for LINEAR, got {width}")
    if width <= 0:
        raise InvalidRenderParameter(f"window width must be > 0 for {function}, got {width}")
    return _Window(float(center), float(width), function)


def _window_arg(window: tuple[float, float, str] | None) -> _Window | None:
    if window is None:
        return None
    try:
        center, width, function = window
        return _check_window(float(center), float(width), VOIFunction.parse(str(function)))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, RenderError):
            raise
        raise InvalidRenderParameter(
            f"window must be (center, width, function), got {window!r}"
        ) from exc


def parse_window(text: str) -> tuple[float, float, str]:
    """PS3.18 ``window=center,width,function`` (function optional, default ``linear``)
    as the tuple :func:`render` takes; raises :class:`InvalidRenderParameter`."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise InvalidRenderParameter(f"window must be 'center,width[,function]', got {text!r}")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise InvalidRenderParameter(f"window center/width must be numbers, got {text!r}") from None
    function = VOIFunction.parse(parts[2]) if len(parts) == 3 else VOIFunction.LINEAR
    checked = _check_window(center, width, function)
    return (checked.center, checked.width, checked.function.value)


def parse_viewport(text: str) -> tuple[int, int]:
    """PS3.18 ``viewport=vw,vh`` as a tuple; the cropping form (``vw,vh,sx,sy,sw,sh``) is
    refused with :class:`InvalidRenderParameter` rather than silently ignored."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise InvalidRenderParameter(
            f"viewport must be 'width,height' (source cropping is not supported), got {text!r}"
        )
    try:
        size = (int(parts[0]), int(parts[1]))
    except ValueError:
        raise InvalidRenderParameter(f"viewport must be two integers, got {text!r}") from None
    checked = _viewport_arg(size)
    assert checked is not None
    return checked


def _viewport_arg(viewport: tuple[int, int] | None) -> tuple[int, int] | None:
    if viewport is None:
        return None
    try:
        width, height = viewport
    except (TypeError, ValueError):
        raise InvalidRenderParameter(
            f"viewport must be (width, height), got {viewport!r}"
        ) from None
    for side in (width, height):
        if isinstance(side, bool) or not isinstance(side, int | np.integer):
            raise InvalidRenderParameter(f"viewport sides must be integers, got {viewport!r}")
        if not 1 <= side <= MAX_VIEWPORT:
            raise InvalidRenderParameter(
                f"viewport sides must be in 1..{MAX_VIEWPORT}, got {viewport!r}"
            )
    return (int(width), int(height))


def _media_type_arg(media_type: str) -> str:
    normalised = media_type.split(";", 1)[0].strip().lower()
    if normalised not in _PIL_FORMATS:
        raise UnsupportedMediaType(
            f"cannot render as {media_type!r}; supported: {', '.join(SUPPORTED_MEDIA_TYPES)}"
        )
    return normalised


def _quality_arg(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int | np.integer):
        raise InvalidRenderParameter(f"quality must be an integer, got {quality!r}")
    if not 1 <= quality <= 100:
        raise InvalidRenderParameter(f"quality must be in 1..100, got {quality}")
    return int(quality)


# ---------------------------------------------------------------------------- public API


def render(
    ds: Dataset,
    frame: int = 1,
    *,
    media_type: str = "image/jpeg",
    window: tuple[float, float, str] | None = None,
    viewport: tuple[int, int] | None = None,
    quality: int = 90,
) -> bytes:
    """Frame ``frame`` (1-based) of ``ds`` as JPEG or PNG bytes.

    ``window=(center, width, function)`` is in modality units (after rescale: HU for CT) and
    overrides the instance's VOI; ``viewport=(w, h)`` fits the image inside w×h keeping its
    aspect ratio (up or down); ``quality`` (1..100) applies to JPEG. Every parameter is
    checked before any pixel is decoded, so a bad request costs nothing.
    """
    fmt = _PIL_FORMATS[_media_type_arg(media_type)]
    voi = _window_arg(window)
    size = _viewport_arg(viewport)
    q = _quality_arg(quality)
    image = Image.fromarray(_render_array(ds, frame, voi))
    if size is not None:
        image = _fit(image, size)
    return _encode(image, fmt, q)


def thumbnail(
    ds: Dataset, frame: int = 1, *, media_type: str = "image/jpeg", size: int = 128
) -> bytes:
    """``render`` with the instance's own VOI, fitted into ``size``×``size``."""
    return render(ds, frame, media_type=media_type, viewport=(size, size))


def render_array(
    ds: Dataset, frame: int = 1, *, window: tuple[float, float, str] | None = None
) -> npt.NDArray[np.uint8]:
    """The 8-bit display pixels ``render`` encodes: (rows, columns) for grayscale, (rows,
    columns, 3) RGB for colour, before any viewport scaling."""
    return _render_array(ds, frame, _window_arg(window))


def _render_array(ds: Dataset, frame: int, voi: _Window | None) -> npt.NDArray[np.uint8]:
    index = _frame_index(ds, frame)
    arr, photometric = _decode_frame(ds, index)
    if photometric in _GRAYSCALE:
        if arr.ndim != 2:
            raise NotRenderable(f"{photometric} frame has shape {arr.shape}, expected 2-D")
        return _grayscale(arr, ds, index, voi, invert=_inverted(ds, photometric))
    if photometric == "PALETTE COLOR":
        return _palette(arr, ds)
    if photometric in _RGB_LIKE or photometric in _YBR:
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise NotRenderable(f"{photometric} frame has shape {arr.shape}, expected (r, c, 3)")
        if photometric in _YBR:  # only if a decoder left it in YCbCr
            arr = convert_color_space(arr, photometric, "RGB")
        return _colour_to_8bit(arr, ds)
    raise NotRenderable(f"photometric interpretation {photometric!r} cannot be rendered")


# ---------------------------------------------------------------------------- decoding


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    try:
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise NotRenderable(f"invalid Number of Frames {value!r}") from None


def _frame_index(ds: Dataset, frame: int) -> int:
    if isinstance(frame, bool) or not isinstance(frame, int | np.integer):
        raise InvalidRenderParameter(f"frame number must be an integer, got {frame!r}")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise NotRenderable("the instance has no pixel data")
    count = _number_of_frames(ds)
    if not 1 <= frame <= count:
        raise FrameNotFound(f"frame {frame} does not exist: the instance has {count} frame(s)")
    return int(frame) - 1


def _decode_frame(ds: Dataset, index: int) -> tuple[npt.NDArray[Any], str]:
    """Decode one frame; return it with the photometric interpretation it is now in."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        raise NotRenderable("the dataset has no Transfer Syntax UID in its file meta")
    syntax = UID(str(syntax))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise NotRenderable(f"no pixel decoder exists for {syntax.name} ({syntax})") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "nothing usable installed"
        raise NotRenderable(f"no decoder installed for {syntax.name} ({syntax}): {missing}")
    try:
        arr, props = decoder.as_array(ds, index=index, **as_pixel_options(ds))
    except Exception as exc:  # every plugin raises its own types; all mean "cannot decode"
        raise NotRenderable(f"cannot decode frame {index + 1} ({syntax.name}): {exc}") from exc
    photometric = str(props.get("photometric_interpretation", "")).strip().upper()
    return arr, photometric


# ---------------------------------------------------------------------------- grayscale


def _first_number(value: Any) -> float | None:
    """First value of a DS/IS element (possibly multi-valued), or None if absent/empty."""
    if value is None:
        return None
    if not isinstance(value, str | bytes | int | float) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    if value in ("", b""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _functional_group_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The first item of ``keyword`` for frame ``index`` in an enhanced multi-frame object:
    per-frame functional groups first, then shared ones (PS3.3 C.7.6.16)."""
    for groups, position in (
        (ds.get("PerFrameFunctionalGroupsSequence"), index),
        (ds.get("SharedFunctionalGroupsSequence"), 0),
    ):
        if groups and position < len(groups):
            sequence = groups[position].get(keyword)
            if sequence:
                item: Dataset = sequence[0]
                return item
    return None


def _lut_table(item: Dataset, ds: Dataset, *, signed_first: bool) -> tuple[int, np.ndarray, int]:
    """(first value mapped, entries as float64, bits per entry) of a Modality/VOI LUT item."""
    descriptor = [int(v) for v in item.LUTDescriptor]
    entries = descriptor[0] or 65536
    first = descriptor[1]
    if signed_first and first > 32767:  # read as US although meant as SS
        first -= 65536
    bits = descriptor[2]
    raw = item["LUTData"].value
    if isinstance(raw, bytes | bytearray):
        little = getattr(getattr(ds, "file_meta", None), "_tsyntax_encoding", (None, True))[1]
        dtype = np.dtype("<u2" if little is not False else ">u2")
        if bits <= 8 and len(raw) == entries:  # 8-bit entries packed two to a word
            table = np.frombuffer(raw, dtype=np.uint8)
        else:
            table = np.frombuffer(raw[: 2 * entries], dtype=dtype)
    else:
        table = np.asarray(raw if isinstance(raw, list | tuple) else [raw])
    if table.size == 0:
        raise NotRenderable("empty LUT Data")
    return first, table.astype(np.float64), bits


def _apply_lut(values: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    idx = np.clip(np.rint(values) - first, 0, table.size - 1).astype(np.intp)
    return np.take(table, idx)


def _modality(ds: Dataset, index: int) -> Callable[[np.ndarray], np.ndarray]:
    """The Modality LUT for frame ``index`` as a function over stored values (float64 out)."""
    sequence = ds.get("ModalityLUTSequence")
    if sequence:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        first, table, _bits = _lut_table(sequence[0], ds, signed_first=signed)
        return lambda v: _apply_lut(v, first, table)
    item = _functional_group_item(ds, index, "PixelValueTransformationSequence") or ds
    slope = _first_number(item.get("RescaleSlope"))
    intercept = _first_number(item.get("RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    if slope == 1.0 and intercept == 0.0:
        return lambda v: v.astype(np.float64, copy=False)
    return lambda v: v * slope + intercept


def _instance_window(ds: Dataset, index: int) -> _Window | None:
    """The instance's first window for this frame, or None if absent or unusable (an invalid
    stored window falls through to the VOI LUT / min-max rather than failing the request)."""
    item = _functional_group_item(ds, index, "FrameVOILUTSequence") or ds
    center = _first_number(item.get("WindowCenter"))
    width = _first_number(item.get("WindowWidth"))
    if center is None or width is None:
        return None
    name = str(item.get("VOILUTFunction", "") or "LINEAR")
    try:
        return _check_window(center, width, VOIFunction.parse(name))
    except InvalidRenderParameter:
        logger.debug("ignoring unusable stored window %s/%s (%s)", center, width, name)
        return None


def _window_unit(values: np.ndarray, voi: _Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window functions, scaled to 0..1 (ymin 0, ymax 1)."""
    c, w = voi.center, voi.width
    if voi.function is VOIFunction.SIGMOID:
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if voi.function is VOIFunction.LINEAR_EXACT:
        y = (values - c) / w + 0.5
    elif w == 1:  # LINEAR with width 1 is a step at c - 0.5
        y = (values > c - 0.5).astype(np.float64)
    else:
        # x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; linear between. The line
        # meets 0 and 1 exactly at those bounds, so clipping is the piecewise definition.
        y = (values - (c - 0.5)) / (w - 1) + 0.5
    return np.clip(y, 0.0, 1.0, out=y)


def _inverted(ds: Dataset, photometric: str) -> bool:
    shape = str(ds.get("PresentationLUTShape", "") or "").upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _padding_range(ds: Dataset) -> tuple[float, float] | None:
    """Pixel Padding Value (to Range Limit): stored values that are not image (outside a CT's
    field of view), left out of the min/max window so they cannot flatten it."""
    value = _first_number(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _first_number(ds.get("PixelPaddingRangeLimit"))
    limit = value if limit is None else limit
    return (min(value, limit), max(value, limit))


def _minmax(arr: np.ndarray, ds: Dataset) -> tuple[Any, Any] | None:
    padding = _padding_range(ds)
    if padding is not None:
        lo, hi = padding
        arr = arr[(arr < lo) | (arr > hi)]
    if arr.dtype.kind == "f":
        arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return None
    return arr.min(), arr.max()


def _grayscale(
    arr: np.ndarray, ds: Dataset, index: int, voi: _Window | None, *, invert: bool
) -> npt.NDArray[np.uint8]:
    modality = _modality(ds, index)
    voi = voi or _instance_window(ds, index)
    voi_lut = None if voi is not None else ds.get("VOILUTSequence")
    needs_minmax = voi is None and not voi_lut
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        # Every value the stored type can hold, in the order of its unsigned view: the
        # table's index for a pixel is then its bit pattern, with no offset or clipping.
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        domain = np.arange(1 << (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)
        minmax = None
        if needs_minmax and (found := _minmax(arr, ds)) is not None:
            minmax = modality(domain[(domain >= found[0]) & (domain <= found[1])])
        table = _display_values(modality(domain), ds, voi, voi_lut, minmax, invert=invert)
        return _lookup(table, arr.view(unsigned))
    # 32-bit integers and float pixel data: transform the frame itself.
    minmax = None
    if needs_minmax and (found := _minmax(arr, ds)) is not None:
        minmax = modality(np.asarray(found, dtype=np.float64))
    values = modality(arr.astype(np.float64))
    return _display_values(values, ds, voi, voi_lut, minmax, invert=invert)


def _lookup(table: npt.NDArray[np.uint8], index: np.ndarray) -> npt.NDArray[np.uint8]:
    """``table[index]`` in slabs of ~64 K pixels: numpy widens the index to intp first, and
    for a 5 MP radiograph that 40 MB temporary costs as much again as the look-up itself."""
    out = np.empty(index.shape, dtype=np.uint8)
    if index.ndim != 2:
        return np.take(table, index, out=out)
    rows = max(1, _LOOKUP_PIXELS // max(1, index.shape[1]))
    for start in range(0, index.shape[0], rows):
        np.take(table, index[start : start + rows], out=out[start : start + rows])
    return out


def _display_values(
    values: np.ndarray,
    ds: Dataset,
    voi: _Window | None,
    voi_lut: Any,
    minmax: np.ndarray | None,
    *,
    invert: bool,
) -> npt.NDArray[np.uint8]:
    """Modality values -> 8-bit display values: VOI, inversion, rounding."""
    unit: np.ndarray
    if voi is not None:
        unit = _window_unit(values, voi)
    elif voi_lut:
        signed = bool(values.size) and float(values.min()) < 0
        first, table, bits = _lut_table(voi_lut[0], ds, signed_first=signed)
        top = float((1 << bits) - 1) if 8 <= bits <= 16 else max(float(table.max()), 1.0)
        unit = np.clip(_apply_lut(values, first, table) / top, 0.0, 1.0)
    elif minmax is not None and minmax.size and float(minmax.max()) > float(minmax.min()):
        lo, hi = float(minmax.min()), float(minmax.max())
        unit = _window_unit(values, _Window((lo + hi) / 2, hi - lo, VOIFunction.LINEAR_EXACT))
    else:  # a flat frame (or only padding): nothing to show
        unit = np.zeros(values.shape)
    if invert:
        unit = 1.0 - unit
    out = np.floor(np.nan_to_num(unit, nan=0.0) * 255.0 + 0.5)  # NaN: float pixel data
    return out.astype(np.uint8)


# ---------------------------------------------------------------------------- colour


def _colour_to_8bit(arr: np.ndarray, ds: Dataset) -> npt.NDArray[np.uint8]:
    if arr.dtype == np.uint8:
        return arr
    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize) or 8)
    shift = max(0, bits - 8)
    return (np.clip(arr, 0, (1 << bits) - 1) >> shift).astype(np.uint8)


def _palette(arr: np.ndarray, ds: Dataset) -> npt.NDArray[np.uint8]:
    try:
        rgb = apply_color_lut(arr, ds)
    except Exception as exc:  # malformed or missing palette descriptors/data
        raise NotRenderable(f"cannot apply the palette colour LUT: {exc}") from exc
    if rgb.ndim == 3 and rgb.shape[2] == 4:  # alpha palette: drop alpha
        rgb = rgb[..., :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    return np.floor(rgb.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------- output


def _fit(image: Image.Image, viewport: tuple[int, int]) -> Image.Image:
    """Scale to fit inside ``viewport`` keeping the aspect ratio (PS3.18 viewport)."""
    width, height = image.size
    scale = min(viewport[0] / width, viewport[1] / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == image.size:
        return image
    # reducing_gap 2: a box reduction by an integer factor first, then Lanczos over the last
    # factor of at least 2 (what Pillow's own thumbnail() does). A 2500x2048 CR into 512x512:
    # 18 ms instead of 38 ms for Lanczos alone, with no visible difference.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- cache


@dataclass(frozen=True, slots=True)
class RenderKey:
    """Everything that determines one rendered image. ``version`` is whatever changes when
    the instance's content does (its sha256, an archive revision): the SOP Instance UID
    alone is not enough, since the hub may replace an instance after a conflict."""

    sop_instance_uid: str
    frame: int
    media_type: str
    window: tuple[float, float, str] | None
    viewport: tuple[int, int] | None
    quality: int
    version: str

    def digest(self) -> str:
        """A hex sha256 of a canonical form: equal requests (``linear`` vs ``LINEAR``,
        ``40`` vs ``40.0``) share an entry, and no UID ever appears in a path."""
        window = None
        if self.window is not None:
            center, width, function = self.window
            window = [float(center), float(width), VOIFunction.parse(str(function)).value]
        viewport = None if self.viewport is None else [int(v) for v in self.viewport]
        canonical = json.dumps(
            [
                RENDERER_VERSION,
                str(self.sop_instance_uid),
                int(self.frame),
                self.media_type.split(";", 1)[0].strip().lower(),
                window,
                viewport,
                int(self.quality),
                str(self.version),
            ],
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_MAGIC: Final = b"TRNDR001"
_HEADER: Final = struct.Struct("<8sQ16s")  # magic, payload length, blake2b-128 of payload
_TEMP_PREFIX: Final = ".tmp-"
_STALE_TEMP_S: Final = 3600.0


def _checksum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class RenderCache:
    """Rendered images on disk under ``directory``, at most ``max_bytes`` in total, least
    recently used evicted first. Thread-safe; get/put cost a file read/write plus a dict
    operation under one lock.

    Each entry is written to a temporary file and renamed into place, and carries its length
    and a checksum: without fsync (this is a cache) a power cut can leave a renamed file
    empty or zero-filled, and such an entry is discarded on read, never served.

    The size is tracked in memory, from a scan of the directory at start (recency from file
    modification times, which hits refresh). One process should own a directory: entries
    written by another process are served, but their bytes are not counted against this
    process's cap until it reads them.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # digest -> bytes on disk
        self._total = 0
        self._made_dirs: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- public

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: RenderKey) -> bytes | None:
        digest = key.digest()
        path = self._path(digest)
        try:
            blob: bytes | None = path.read_bytes()  # outside the lock: replace() is atomic
        except OSError:
            blob = None
        data = None if blob is None else self._unwrap(blob)
        with self._lock:
            if data is None:
                self.misses += 1
                if blob is not None:
                    logger.warning("discarding corrupt render cache entry %s", digest)
                    self._forget(digest)
                    with contextlib.suppress(OSError):
                        path.unlink()
                elif digest in self._entries:  # deleted behind our back, or a racing put
                    self._sync(digest, path)
                return None
            if digest in self._entries:
                self._entries.move_to_end(digest)
            else:  # another process wrote it, or it was evicted since we read it
                self._sync(digest, path)
            self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # recency survives a restart
        return data

    def put(self, key: RenderKey, data: bytes) -> bool:
        """Store ``data``; False if it was not stored (larger than the cap, disk error).
        A cache failure never fails the caller's request: it is logged and ignored."""
        size = _HEADER.size + len(data)
        if size > self.max_bytes:
            return False
        digest = key.digest()
        path = self._path(digest)
        temp: str | None = None
        try:
            if digest[:2] not in self._made_dirs:
                path.parent.mkdir(exist_ok=True)
                self._made_dirs.add(digest[:2])
            fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(_HEADER.pack(_MAGIC, len(data), _checksum(data)))
                handle.write(data)
            with self._lock:
                os.replace(temp, path)
                temp = None
                self._forget(digest)
                self._entries[digest] = size
                self._total += size
                self._evict()
            return True
        except OSError as exc:
            logger.warning("render cache: could not store %s: %s", digest, exc)
            return False
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)

    def get_or_render(self, key: RenderKey, produce: Callable[[], bytes]) -> bytes:
        """The cached bytes for ``key``, else ``produce()`` (stored for next time)."""
        cached = self.get(key)
        if cached is not None:
            return cached
        data = produce()
        self.put(key, data)
        return data

    def path_for(self, key: RenderKey) -> Path:
        """Where ``key``'s entry lives (present or not): for operators and tests."""
        return self._path(key.digest())

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._total,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }

    # -- internals

    def _path(self, digest: str) -> Path:
        return self.directory / digest[:2] / digest

    @staticmethod
    def _unwrap(blob: bytes) -> bytes | None:
        if len(blob) < _HEADER.size:
            return None
        magic, length, checksum = _HEADER.unpack_from(blob)
        data = blob[_HEADER.size :]
        if magic != _MAGIC or length != len(data) or checksum != _checksum(data):
            return None
        return data

    def _forget(self, digest: str) -> None:
        """Drop ``digest`` from the index (lock held)."""
        size = self._entries.pop(digest, None)
        if size is not None:
            self._total -= size

    def _sync(self, digest: str, path: Path) -> None:
        """Make the index agree with the disk for ``digest`` (lock held). Every index change
        happens under the lock together with its file operation, so the in-memory total is
        the bytes on disk; only here is the disk consulted, for changes made elsewhere."""
        self._forget(digest)
        try:
            size = path.stat().st_size
        except OSError:
            return
        self._entries[digest] = size
        self._total += size
        self._evict()

    def _evict(self) -> None:
        """Remove least recently used entries until under the cap (lock held)."""
        while self._total > self.max_bytes and self._entries:
            digest, size = self._entries.popitem(last=False)
            self._total -= size
            self.evictions += 1
            with contextlib.suppress(FileNotFoundError):
                self._path(digest).unlink()

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        now = time.time()
        with os.scandir(self.directory) as subdirs:
            fanout = [d for d in subdirs if d.is_dir(follow_symlinks=False) and len(d.name) == 2]
        for sub in fanout:
            self._made_dirs.add(sub.name)
            with os.scandir(sub.path) as entries:
                for entry in entries:
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if entry.name.startswith(_TEMP_PREFIX):
                        # Left by a crash mid-put; a young one may be another process's put.
                        if now - stat.st_mtime > _STALE_TEMP_S:
                            with contextlib.suppress(OSError):
                                os.unlink(entry.path)
                        continue
                    if len(entry.name) == 64 and entry.name.startswith(sub.name):
                        found.append((stat.st_mtime, entry.name, stat.st_size))
        found.sort()
        for _mtime, digest, size in found:
            self._entries[digest] = size
            self._total += size
        self._evict()
        logger.info(
            "render cache %s: %d entries, %d bytes (cap %d)",
            self.directory,
            len(self._entries),
            self._total,
            self.max_bytes,
        )
