"""Instances for DICOMweb: which ones a request names (the registry), their headers as DICOM
JSON, where each frame's bytes are in the stored file, and the bytes themselves.

Why a cache of parsed headers: a viewer opening a 120-slice CT asks for the series metadata
once, then for 120 frames one request each, and comes back for the next reader. Parsing a
header costs ~1-3 ms of pydicom; finding a frame in the file means walking its encapsulated
items. Both depend only on the stored bytes, so they are kept per (SOP Instance UID, sha256)
in a small in-memory LRU (``InstanceStore``, bounded in bytes): a second look at a series
reads no file at all for its metadata, and a frame is one ``pread`` of exactly its bytes.
The sha256 in the key means a replaced instance is never answered from stale offsets.

The first time, only the header is read (``stop_before_pixels``); the file position is then
at the Pixel Data element, whose item headers are walked with seeks, never read whole.

Nothing here knows about HTTP or who is asking: the routes check access first.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import as_pixel_options, get_decoder, get_encoder
from pydicom.tag import Tag
from pydicom.uid import UID
from sqlalchemy import bindparam, select
from sqlalchemy.engine import Engine

from reading_queue import QueueError
from reading_queue.intake.archive import Archive, ArchiveError, FilesystemArchive
from reading_queue.models import HubInstance, HubStudy, Study
from viewer_api.dicomweb.multipart import (
    BIG_ENDIAN,
    DEFLATED,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    LITTLE_ENDIAN_NATIVE,
    NATIVE_SYNTAXES,
)

logger = logging.getLogger(__name__)

#: Binary values longer than this go out as a BulkDataURI, not inline (PS3.18 F.2.6).
BULK_THRESHOLD: Final = 1024
BULK_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Cached headers: ~6 KB each for a CT, so ~10,000 instances.
DEFAULT_CACHE_BYTES: Final = 64 * 1024 * 1024
#: Stands for the DICOMweb root URL in cached JSON. JSON escapes control characters, so
#: the serialised ``"\u0001`` can only be the start of a string we wrote.
BASE_MARKER: Final = "\x01"
BASE_MARKER_JSON: Final = b'"\\u0001'

_PIXEL_TAGS: Final = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW"}
_ITEM: Final = 0xFFFEE000
_SEQUENCE_END: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
#: Lossless syntaxes pydicom can encode (JPEG-LS, RLE, JPEG 2000 lossless).
LOSSLESS_ENCODABLE: Final = frozenset(
    {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"}
)


class InstanceError(QueueError):
    """An instance cannot be read or is not what its header says (bad frame offsets...)."""


class NoPixelData(InstanceError):
    """The instance has no pixel data, so no frames (an SR, a PDF...)."""


class BadFrame(InstanceError):
    """A frame number outside 1..NumberOfFrames."""


class NoSuchBulkData(InstanceError):
    """The bulk data path names no binary element of the instance."""


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """What the hub's registry says about a committed instance."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sha256: str
    size: int
    archive_ref: str


_COLUMNS = (
    HubInstance.sop_instance_uid,
    HubInstance.study_uid,
    HubInstance.series_uid,
    HubInstance.sop_class_uid,
    HubInstance.sha256,
    HubInstance.size,
    HubInstance.archive_ref,
)


class Registry:
    """Read-only look-ups (plain snapshot reads on SQLite: never the writer's lock). The
    statements are built once, with bound parameters: a viewer makes one request per frame,
    and building a SQLAlchemy expression costs more than running it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine.execution_options(read_only=True)
        committed = select(*_COLUMNS).where(
            HubInstance.study_uid == bindparam("study"), HubInstance.state == "committed"
        )
        order = (HubInstance.series_uid, HubInstance.received_at)
        self._by_study = committed.order_by(*order)
        self._by_series = committed.where(HubInstance.series_uid == bindparam("series")).order_by(
            *order
        )
        self._by_sop = committed.where(
            HubInstance.series_uid == bindparam("series"),
            HubInstance.sop_instance_uid == bindparam("sop"),
        )
        self._sop_in_study = committed.where(HubInstance.sop_instance_uid == bindparam("sop"))
        self._exists = (
            select(HubStudy.study_uid)
            .where(HubStudy.study_uid == bindparam("study"))
            .union(select(Study.study_uid).where(Study.study_uid == bindparam("study")))
        )

    def instances(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[InstanceRow]:
        """The committed instances of a study (of a series, or one instance), in the order
        they were received within each series."""
        params: dict[str, str] = {"study": study_uid}
        if series_uid is None and sop_uid is None:
            stmt = self._by_study
        elif sop_uid is None:
            stmt, params["series"] = self._by_series, str(series_uid)
        elif series_uid is None:
            stmt, params["sop"] = self._sop_in_study, sop_uid
        else:
            stmt = self._by_sop
            params.update(series=series_uid, sop=sop_uid)
        with self.engine.connect() as conn:
            return [InstanceRow(*row) for row in conn.execute(stmt, params)]

    def study_exists(self, study_uid: str) -> bool:
        """Whether the hub knows the study at all (for the audit trail of a refusal only:
        the caller's answer never depends on it)."""
        with self.engine.connect() as conn:
            return conn.execute(self._exists, {"study": study_uid}).first() is not None


# ---------------------------------------------------------------------------- parsed headers


@dataclass(frozen=True, slots=True)
class PixelLayout:
    """Where the frames are in the stored file.

    Native: frame ``i`` is ``frame_length`` bytes at ``value_offset + i * frame_length``
    (``frame_bits`` when frames are bit-packed and not byte aligned). Encapsulated:
    ``fragments[i]`` are the (offset, length) of the fragment values of frame ``i``.
    ``in_file`` False (deflated files): the offsets mean nothing, the file is read whole.
    """

    syntax: str
    keyword: str
    vr: str
    number_of_frames: int
    encapsulated: bool
    value_offset: int
    value_length: int
    frame_length: int = 0
    frame_bits: int = 0
    bits_allocated: int = 16
    fragments: tuple[tuple[tuple[int, int], ...], ...] = ()
    in_file: bool = True
    #: pydicom decoding options (rows, columns, ...), without the frame count
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    row: InstanceRow
    syntax: str
    #: the instance's DICOM JSON object, UTF-8, with ``BASE_MARKER`` for the root URL
    json: bytes
    instance_number: int | None
    series_number: int | None
    pixels: PixelLayout | None
    #: bytes this entry holds, roughly (for the cache's bound)
    cost: int

    @property
    def number_of_frames(self) -> int:
        return self.pixels.number_of_frames if self.pixels else 0

    def check_frames(self, frames: Iterable[int]) -> list[int]:
        if self.pixels is None:
            raise NoPixelData(
                f"instance {self.row.sop_instance_uid} has no pixel data, so no frames"
            )
        out = list(frames)
        count = self.pixels.number_of_frames
        for n in out:
            if not 1 <= n <= count:
                raise BadFrame(f"frame {n} does not exist: the instance has {count} frame(s)")
        return out


def _as_int(value: Any) -> int | None:
    try:
        if value in (None, ""):
            return None
        return int(value)
    except (TypeError, ValueError):
        return None


def _tag_hex(tag: int) -> str:
    return f"{tag:08X}"


def _sanitise(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _sanitise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sanitise(v) for v in value]
    return value


def element_json(elem: DataElement, path: str, bulk_prefix: str) -> dict[str, Any]:
    """One element as DICOM JSON; binary values over ``BULK_THRESHOLD`` as a BulkDataURI
    ``bulk_prefix/<path>``. Sequences recurse with ``<tag>/<item index>/`` paths."""
    if elem.VR == "SQ":
        items = [
            dataset_json(item, f"{path}/{index}/", bulk_prefix)
            for index, item in enumerate(elem.value or [])
        ]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if elem.VR in BULK_VRS and not elem.is_empty:
        value = elem.value
        size = len(value) if isinstance(value, bytes | bytearray) else 0
        if size > BULK_THRESHOLD:
            return {"vr": elem.VR, "BulkDataURI": f"{bulk_prefix}/{path}"}
    try:
        return dict(elem.to_json_dict(None, 1 << 62))
    except Exception as exc:  # a value pydicom cannot convert: keep the element, not the value
        logger.debug("element %s not converted to JSON: %s", _tag_hex(elem.tag), exc)
        return {"vr": elem.VR}


# The fast path: most of a header's elements go from their raw bytes straight to DICOM JSON,
# giving what pydicom's DataElement.to_json_dict gives (tests compare the two on pydicom's
# test files) at a fraction of the cost: the first look at a 120-slice series is a viewer
# waiting. Anything unusual (ISO 2022 character sets, ambiguous or UN VRs, sequences,
# undecodable text) takes pydicom's path.
_SIMPLE_CHARSETS: Final = {"iso8859": "latin-1", "latin_1": "latin-1", "UTF8": "utf-8"}
_NUMBERS: Final = {
    "US": ("H", 2), "SS": ("h", 2), "UL": ("L", 4), "SL": ("l", 4), "FL": ("f", 4),
    "FD": ("d", 8), "UV": ("Q", 8), "SV": ("q", 8),
}  # fmt: skip
_SPLIT_ROOT: Final = frozenset({"AS", "CS", "DA", "DT", "TM"})
_SPLIT_EACH: Final = frozenset({"SH", "LO", "UC"})
_SINGLE_TEXT: Final = frozenset({"ST", "LT", "UT"})
_BINARY: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})


def _charset(ds: Dataset) -> str | None:
    """The Python codec for the dataset's text, when it is one simple codec."""
    try:
        found = ds._character_set
    except Exception:
        return None
    if isinstance(found, list | tuple):
        if len(found) != 1:
            return None
        found = found[0]
    return _SIMPLE_CHARSETS.get(str(found))


def _fast_json(
    raw: RawDataElement, vr: str, path: str, bulk_prefix: str, text_codec: str | None
) -> dict[str, Any] | None:
    """``raw`` as DICOM JSON without pydicom's conversion, or None: let pydicom do it."""
    value: bytes | None = raw.value
    if value is None:
        return None
    if not value:
        return {"vr": vr}
    if vr in _BINARY:
        if len(value) > BULK_THRESHOLD:
            return {"vr": vr, "BulkDataURI": f"{bulk_prefix}/{path}"}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    number = _NUMBERS.get(vr)
    if number is not None:
        code, size = number
        if len(value) % size:
            return None
        end = "<" if raw.is_little_endian else ">"
        return {"vr": vr, "Value": list(struct.unpack(f"{end}{len(value) // size}{code}", value))}
    try:
        if vr in _SPLIT_ROOT:
            items = value.decode("latin-1").rstrip(" \x00").split("\\")
        elif vr == "UI":
            items = value.decode("latin-1").rstrip("\x00 ").split("\\")
        elif vr == "AE":
            items = [v.strip() for v in value.decode("latin-1").split("\\")]
        elif vr in ("IS", "DS"):
            texts = value.decode("latin-1").strip(" \x00").split("\\")
            numbers: list[Any] = []
            for text in texts:
                text = text.strip()
                if not text:
                    numbers.append(None)
                elif vr == "IS":
                    numbers.append(int(text))
                else:
                    number_value = float(text)
                    if not math.isfinite(number_value):
                        return None
                    numbers.append(number_value)
            if numbers == [None]:
                return {"vr": vr}
            return {"vr": vr, "Value": numbers}
        elif text_codec is None:
            return None
        elif vr in _SPLIT_EACH:
            items = [v.rstrip("\x00 ") for v in value.decode(text_codec).split("\\")]
        elif vr in _SINGLE_TEXT:
            items = [value.decode(text_codec).rstrip("\x00 ")]
        elif vr == "UR":
            items = [value.decode("latin-1").rstrip()]
        elif vr == "PN":
            names = value.rstrip(b"\x00 ").decode(text_codec).split("\\")
            if names == [""]:
                return {"vr": vr}
            out = []
            for name in names:
                groups = name.split("=")
                while len(groups) > 1 and groups[-1] == "":
                    groups.pop()
                comps = {"Alphabetic": groups[0]}
                if len(groups) > 1:
                    comps["Ideographic"] = groups[1]
                if len(groups) > 2:
                    comps["Phonetic"] = groups[2]
                out.append(comps)
            return {"vr": vr, "Value": out}
        else:
            return None
    except (UnicodeDecodeError, ValueError):
        return None
    if items == [""]:
        return {"vr": vr}
    return {"vr": vr, "Value": items}


def _raw_vr(raw: RawDataElement) -> str | None:
    """The VR the fast path may use: the explicit one, or the dictionary's for a public tag
    in an implicit VR file; None for SQ, UN and ambiguous VRs (pydicom resolves those)."""
    vr = raw.VR
    if vr is None:
        if raw.tag >> 16 & 1:  # private group: pydicom knows the private dictionaries
            return None
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    vr = str(vr)
    if vr in ("SQ", "UN") or " " in vr:
        return None
    return vr


def dataset_json(ds: Dataset, path: str, bulk_prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    text_codec = _charset(ds)
    elements = ds._dict
    for tag in sorted(elements):
        key = _tag_hex(tag)
        raw = elements[tag]
        if isinstance(raw, RawDataElement):
            vr = _raw_vr(raw)
            if vr is not None:
                fast = _fast_json(raw, vr, f"{path}{key}", bulk_prefix, text_codec)
                if fast is not None:
                    out[key] = fast
                    continue
        out[key] = element_json(ds[tag], f"{path}{key}", bulk_prefix)
    return out


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or infinity in an FD/FL value: JSON has no such number
        text = json.dumps(_sanitise(obj), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8")


def instance_path(row: InstanceRow) -> str:
    """The instance's path below the DICOMweb root."""
    return f"/studies/{row.study_uid}/series/{row.series_uid}/instances/{row.sop_instance_uid}"


def _read_struct(fp: IO[bytes], fmt: str) -> tuple[Any, ...]:
    size = struct.calcsize(fmt)
    raw = fp.read(size)
    if len(raw) != size:
        raise InstanceError("the file ends inside the pixel data")
    return struct.unpack(fmt, raw)


def _items(fp: IO[bytes], end: str, file_size: int) -> list[tuple[int, int]]:
    """(value offset, length) of every item from the current position to the sequence
    delimiter, seeking over the values."""
    found: list[tuple[int, int]] = []
    while True:
        head = fp.read(8)
        if len(head) < 8:
            # no sequence delimiter: tolerated at the very end of a file
            return found
        group, element, length = struct.unpack(f"{end}HHL", head)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return found
        if tag != _ITEM or length == _UNDEFINED:
            raise InstanceError(f"unexpected tag {tag:08X} in the encapsulated pixel data")
        start = fp.tell()
        if start + length > file_size:
            raise InstanceError("a pixel data fragment runs past the end of the file")
        found.append((start, length))
        fp.seek(length, os.SEEK_CUR)


def _group_fragments(
    fp: IO[bytes],
    items: list[tuple[int, int]],
    frames: int,
    basic: list[int],
    extended: tuple[list[int], list[int]] | None,
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The fragments of each frame, by the Extended or Basic Offset Table, else by
    count, else by JPEG end-of-image markers (as ``pydicom.encaps.generate_fragmented_frames``
    decides)."""
    if not items:
        raise InstanceError("the encapsulated pixel data has no fragments")
    first_item = items[0][0] - 8
    if extended is not None:
        offsets, lengths = extended
        pairs = zip(offsets, lengths, strict=False)
        return tuple(((first_item + offset + 8, length),) for offset, length in pairs)
    if basic:
        grouped: list[list[tuple[int, int]]] = [[] for _ in basic]
        frame = 0
        for start, length in items:
            relative = start - 8 - first_item
            while frame + 1 < len(basic) and relative >= basic[frame + 1]:
                frame += 1
            grouped[frame].append((start, length))
        return tuple(tuple(g) for g in grouped)
    if frames <= 1:
        return (tuple(items),)
    if len(items) == frames:
        return tuple((item,) for item in items)
    if len(items) < frames:
        raise InstanceError(
            f"{len(items)} pixel data fragments for {frames} frames and no offset table"
        )
    result: list[tuple[tuple[int, int], ...]] = []
    current: list[tuple[int, int]] = []
    for start, length in items:
        current.append((start, length))
        fp.seek(start + max(0, length - 10))
        if b"\xff\xd9" in fp.read(min(10, length)):
            result.append(tuple(current))
            current = []
    if current:
        result.append(tuple(current))
    return tuple(result)


def _native_frame(ds: Dataset, keyword: str) -> tuple[int, int]:
    """(bytes per frame, bits per frame) of native pixel data."""
    rows = int(ds.get("Rows", 0) or 0)
    columns = int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if keyword == "FloatPixelData":
        bits = 32
    elif keyword == "DoubleFloatPixelData":
        bits = 64
    else:
        bits = int(ds.get("BitsAllocated", 16) or 16)
    pixels = rows * columns
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        frame_bits = pixels * 2 * bits
    else:
        frame_bits = pixels * samples * bits
    return frame_bits // 8, frame_bits


def _pixel_layout(
    fp: IO[bytes], ds: Dataset, syntax: str, file_size: int
) -> tuple[PixelLayout | None, int]:
    """The layout of the pixel element at the current position (None: no pixel data), and
    the element's tag."""
    position = fp.tell()
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit = syntax == IMPLICIT_VR_LE
    if little is None:
        little = syntax != BIG_ENDIAN
    end = "<" if little else ">"
    head = fp.read(8)
    if len(head) < 8:
        return None, 0
    group, element = struct.unpack(f"{end}HH", head[:4])
    tag = group << 16 | element
    if tag not in _PIXEL_TAGS:
        return None, 0
    if implicit:
        (length,) = struct.unpack(f"{end}L", head[4:8])
        vr = _PIXEL_TAGS[tag] if tag != 0x7FE00010 else "OW"
        value_offset = position + 8
    else:
        vr = head[4:6].decode("ascii", "replace")
        (length,) = _read_struct(fp, f"{end}L")
        value_offset = position + 12
    keyword = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}.get(
        tag, "PixelData"
    )
    frames = max(1, _as_int(ds.get("NumberOfFrames")) or 1)
    bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
    options = {k: v for k, v in as_pixel_options(ds).items() if k not in ("number_of_frames",)}
    options.pop("extended_offsets", None)
    if length != _UNDEFINED:
        if value_offset + length > file_size:
            raise InstanceError("the pixel data runs past the end of the file")
        frame_length, frame_bits = _native_frame(ds, keyword)
        if frame_bits == 0:
            raise InstanceError("Rows or Columns missing: cannot find the frames")
        needed = (frame_bits * frames + 7) // 8
        if needed > length:
            raise InstanceError(f"pixel data holds {length} bytes, {frames} frame(s) need {needed}")
        return (
            PixelLayout(
                syntax=syntax,
                keyword=keyword,
                vr=vr,
                number_of_frames=frames,
                encapsulated=False,
                value_offset=value_offset,
                value_length=length,
                frame_length=frame_length,
                frame_bits=frame_bits,
                bits_allocated=32 if keyword == "FloatPixelData" else 64
                if keyword == "DoubleFloatPixelData" else bits_allocated,
                options=options,
            ),
            tag,
        )  # fmt: skip
    # Encapsulated: the Basic Offset Table item, then the fragments.
    fp.seek(value_offset)
    bot = _items_one(fp, end)
    basic: list[int] = []
    if bot[1]:
        fp.seek(bot[0])
        raw = fp.read(bot[1])
        basic = list(struct.unpack(f"{end}{len(raw) // 4}L", raw[: len(raw) // 4 * 4]))
    fp.seek(bot[0] + bot[1])
    items = _items(fp, end, file_size)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        table, lengths = ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths
        n = len(table) // 8
        extended = (
            list(struct.unpack(f"{end}{n}Q", table[: n * 8])),
            list(struct.unpack(f"{end}{len(lengths) // 8}Q", lengths[: len(lengths) // 8 * 8])),
        )
    fragments = _group_fragments(fp, items, frames, basic, extended)
    if len(fragments) < frames:
        raise InstanceError(f"found {len(fragments)} frame(s) in the pixel data, not {frames}")
    return (
        PixelLayout(
            syntax=syntax,
            keyword=keyword,
            vr="OB",
            number_of_frames=frames,
            encapsulated=True,
            value_offset=value_offset,
            value_length=0,
            bits_allocated=bits_allocated,
            fragments=fragments[:frames],
            options=options,
        ),
        tag,
    )


def _items_one(fp: IO[bytes], end: str) -> tuple[int, int]:
    group, element, length = _read_struct(fp, f"{end}HHL")
    if (group << 16 | element) != _ITEM or length == _UNDEFINED:
        raise InstanceError("the encapsulated pixel data does not start with an offset table")
    return fp.tell(), length


_META_READ: Final = 64 * 1024
_LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN",
                              b"UR", b"UT"})  # fmt: skip


def meta_syntax(fp: IO[bytes]) -> str:
    """The Transfer Syntax UID of a Part-10 file's meta group (always Explicit VR Little
    Endian), read element by element: a few hundred bytes, no dataset parsing."""
    fp.seek(0)
    if fp.read(132)[128:] != b"DICM":
        raise InstanceError("not a DICOM Part-10 file (no DICM prefix)")
    while True:
        head = fp.read(8)
        if len(head) < 8:
            break
        group, element = struct.unpack("<HH", head[:4])
        if group != 0x0002:
            break
        vr = head[4:6]
        if vr in _LONG_VRS:
            (length,) = _read_struct(fp, "<L")
        else:
            (length,) = struct.unpack("<H", head[6:8])
        value = fp.read(length)
        if element == 0x0010:
            return value.rstrip(b"\x00 ").decode("ascii", "replace") or EXPLICIT_VR_LE
    raise InstanceError("the file meta has no Transfer Syntax UID")


def parse_header(row: InstanceRow, fp: IO[bytes], file_size: int) -> InstanceInfo:
    """Read the header of the Part-10 file ``fp`` (positioned at 0) and find its frames."""
    try:
        ds = dcmread(fp, stop_before_pixels=True)
    except Exception as exc:
        raise InstanceError(f"instance {row.sop_instance_uid} does not parse: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    syntax = syntax or EXPLICIT_VR_LE
    pixels: PixelLayout | None = None
    pixel_tag = 0
    if syntax == DEFLATED:
        fp.seek(0)
        full = dcmread(fp)
        for tag, keyword in ((0x7FE00010, "PixelData"), (0x7FE00008, "FloatPixelData"),
                             (0x7FE00009, "DoubleFloatPixelData")):  # fmt: skip
            if tag in full:
                frame_length, frame_bits = _native_frame(full, keyword)
                pixels = PixelLayout(
                    syntax=syntax,
                    keyword=keyword,
                    vr=full[tag].VR,
                    number_of_frames=max(1, _as_int(full.get("NumberOfFrames")) or 1),
                    encapsulated=False,
                    value_offset=0,
                    value_length=len(full[tag].value),
                    frame_length=frame_length,
                    frame_bits=frame_bits,
                    bits_allocated=int(full.get("BitsAllocated", 16) or 16),
                    in_file=False,
                )
                pixel_tag = tag
                break
    else:
        try:
            pixels, pixel_tag = _pixel_layout(fp, ds, syntax, file_size)
        except (InstanceError, struct.error, ValueError) as exc:
            raise InstanceError(
                f"instance {row.sop_instance_uid}: cannot locate its frames: {exc}"
            ) from exc
    prefix = BASE_MARKER + instance_path(row) + "/bulk"
    obj = dataset_json(ds, "", prefix)
    obj["00020010"] = {"vr": "UI", "Value": [syntax]}
    obj.setdefault("00083002", {"vr": "UI", "Value": [syntax]})
    if pixels is not None:
        # OHIF asks for frames 1..NumberOfFrames; a single-frame image says 1 outright.
        obj.setdefault("00280008", {"vr": "IS", "Value": [pixels.number_of_frames]})
        obj[_tag_hex(pixel_tag)] = {"vr": pixels.vr, "BulkDataURI": f"{prefix}/{pixel_tag:08X}"}
    ordered = dict(sorted(obj.items()))
    body = _dumps(ordered)
    frames_cost = sum(len(f) for f in pixels.fragments) * 16 if pixels else 0
    return InstanceInfo(
        row=row,
        syntax=syntax,
        json=body,
        instance_number=_as_int(ds.get("InstanceNumber")),
        series_number=_as_int(ds.get("SeriesNumber")),
        pixels=pixels,
        cost=len(body) + frames_cost + 512,
    )


# ---------------------------------------------------------------------------- the store


class InstanceStore:
    """Stored instances, their parsed headers (an LRU bounded by ``max_bytes``) and their
    frames. Thread-safe: the routes run in FastAPI's thread pool."""

    def __init__(
        self, archive: Archive, engine: Engine, *, max_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.archive = archive
        self.registry = Registry(engine)
        self.max_bytes = max_bytes
        self._root: Path | None = None
        if isinstance(archive, FilesystemArchive):
            self._root = archive.root.resolve()
        self._lock = threading.Lock()
        self._infos: OrderedDict[tuple[str, str], InstanceInfo] = OrderedDict()
        self._syntaxes: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    # -- files

    def _path(self, row: InstanceRow) -> Path | None:
        """The file of a filesystem archive (kept inside it, as the archive itself does)."""
        if self._root is None:
            return None
        path = (self._root / row.archive_ref).resolve()
        if self._root not in path.parents:
            raise InstanceError(f"reference outside the archive: {row.archive_ref}")
        return path

    def read(self, row: InstanceRow) -> bytes:
        """The whole stored Part-10 file."""
        path = self._path(row)
        try:
            if path is not None:
                return path.read_bytes()
            return self.archive.retrieve(row.archive_ref)
        except (OSError, ArchiveError) as exc:
            raise InstanceError(f"instance {row.sop_instance_uid} unavailable: {exc}") from exc

    @contextmanager
    def _open(self, row: InstanceRow) -> Iterator[tuple[IO[bytes], int]]:
        path = self._path(row)
        try:
            if path is not None:
                with path.open("rb") as fp:
                    yield fp, os.fstat(fp.fileno()).st_size
                return
            data = self.archive.retrieve(row.archive_ref)
        except (OSError, ArchiveError) as exc:
            raise InstanceError(f"instance {row.sop_instance_uid} unavailable: {exc}") from exc
        yield io.BytesIO(data), len(data)

    # -- headers

    def info(self, row: InstanceRow) -> InstanceInfo:
        key = (row.sop_instance_uid, row.sha256)
        with self._lock:
            found = self._infos.get(key)
            if found is not None:
                self._infos.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        with self._open(row) as (fp, size):
            info = parse_header(row, fp, size)
        with self._lock:
            if key not in self._infos:
                self._infos[key] = info
                self._bytes += info.cost
                while self._bytes > self.max_bytes and len(self._infos) > 1:
                    _, old = self._infos.popitem(last=False)
                    self._bytes -= old.cost
        return info

    def infos(self, rows: Iterable[InstanceRow]) -> list[InstanceInfo]:
        return [self.info(row) for row in rows]

    def warm(self, study_uid: str) -> int:
        """Parse the headers of a study not yet looked at (up to half the cache); returns
        how many were read. Never raises: warming is an optimisation."""
        done = 0
        try:
            for row in self.registry.instances(study_uid):
                if self._bytes > self.max_bytes // 2:
                    break
                try:
                    self.info(row)
                    done += 1
                except InstanceError as exc:
                    logger.info("not warming %s: %s", row.sop_instance_uid, exc)
        except Exception:
            logger.exception("warming the headers of study %s failed", study_uid)
        return done

    def syntax(self, row: InstanceRow, data: bytes | None = None) -> str:
        """The stored transfer syntax: from the header cache, else from the file meta only
        (of ``data`` when the caller holds the file already, else a few hundred bytes read)."""
        key = (row.sop_instance_uid, row.sha256)
        with self._lock:
            info = self._infos.get(key)
            if info is not None:
                return info.syntax
            known = self._syntaxes.get(key)
            if known is not None:
                return known
        if data is not None:
            syntax = meta_syntax(io.BytesIO(data[:_META_READ]))
        else:
            with self._open(row) as (fp, _size):
                syntax = meta_syntax(fp)
        with self._lock:
            self._syntaxes[key] = syntax
            while len(self._syntaxes) > 100_000:
                self._syntaxes.popitem(last=False)
        return syntax

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._infos),
                "bytes": self._bytes,
                "hits": self.hits,
                "misses": self.misses,
            }

    # -- frames

    def frames(self, info: InstanceInfo, numbers: list[int], *, convert: bool) -> Iterator[bytes]:
        """The bytes of frames ``numbers`` (1-based, checked by ``info.check_frames``): as
        stored, or with ``convert`` as Explicit VR Little Endian pixels (decoded or
        byte-swapped)."""
        pixels = info.pixels
        assert pixels is not None
        if not pixels.in_file:
            ds = dcmread(io.BytesIO(self.read(info.row)))
            value = ds[pixels.keyword].value
            for n in numbers:
                yield _native_slice(value, pixels, n - 1)
            return
        with self._open(info.row) as (fp, _size):
            for n in numbers:
                raw = _read_frame(fp, pixels, n - 1)
                if convert:
                    raw = _to_explicit_le(raw, pixels)
                yield raw

    def dataset(self, row: InstanceRow) -> Dataset:
        """The whole instance, pixels included (rendering, transcoding)."""
        data = self.read(row)
        try:
            return dcmread(io.BytesIO(data))
        except Exception as exc:
            raise InstanceError(f"instance {row.sop_instance_uid} does not parse: {exc}") from exc

    def bulk(self, row: InstanceRow, path: list[str]) -> tuple[str, bytes]:
        """(VR, value) of the binary element at ``path`` (``TTTTTTTT`` or
        ``TTTTTTTT/<item>/TTTTTTTT``...); Pixel Data is answered as frames instead."""
        ds: Dataset = self.dataset(row)
        elem: DataElement | None = None
        try:
            steps = list(path)
            while steps:
                tag = Tag(int(steps.pop(0), 16))
                elem = ds[tag]
                if steps:
                    if elem.VR != "SQ":
                        raise NoSuchBulkData("a bulk data path goes into sequences only")
                    ds = elem.value[int(steps.pop(0))]
        except (KeyError, ValueError, IndexError, TypeError):
            raise NoSuchBulkData(f"no bulk data at {'/'.join(path)}") from None
        if elem is None or elem.VR not in BULK_VRS or not isinstance(elem.value, bytes):
            raise NoSuchBulkData(f"no bulk data at {'/'.join(path)}")
        return elem.VR, elem.value


def _read_frame(fp: IO[bytes], pixels: PixelLayout, index: int) -> bytes:
    if pixels.encapsulated:
        parts = []
        for offset, length in pixels.fragments[index]:
            parts.append(_pread(fp, offset, length))
        return parts[0] if len(parts) == 1 else b"".join(parts)
    if pixels.frame_bits % 8 == 0:
        return _pread(fp, pixels.value_offset + index * pixels.frame_length, pixels.frame_length)
    start_bit = index * pixels.frame_bits
    first = start_bit // 8
    last = (start_bit + pixels.frame_bits + 7) // 8
    chunk = _pread(fp, pixels.value_offset + first, last - first)
    return _bit_slice(chunk, start_bit - first * 8, pixels.frame_bits)


def _native_slice(value: bytes, pixels: PixelLayout, index: int) -> bytes:
    if pixels.frame_bits % 8 == 0:
        start = index * pixels.frame_length
        return bytes(value[start : start + pixels.frame_length])
    start_bit = index * pixels.frame_bits
    first = start_bit // 8
    last = (start_bit + pixels.frame_bits + 7) // 8
    return _bit_slice(bytes(value[first:last]), start_bit - first * 8, pixels.frame_bits)


def _bit_slice(chunk: bytes, skip: int, count: int) -> bytes:
    """``count`` bits from bit ``skip`` of ``chunk`` (DICOM packs bits LSB first), re-packed
    from bit 0 and padded to whole bytes."""
    bits = np.unpackbits(np.frombuffer(chunk, dtype=np.uint8), bitorder="little")
    return np.packbits(bits[skip : skip + count], bitorder="little").tobytes()


def _pread(fp: IO[bytes], offset: int, length: int) -> bytes:
    try:
        fileno = fp.fileno()
    except (OSError, io.UnsupportedOperation):
        fp.seek(offset)
        data = fp.read(length)
    else:
        data = os.pread(fileno, length, offset)
    if len(data) != length:
        raise InstanceError("the file ended before the frame did")
    return data


def _to_explicit_le(raw: bytes, pixels: PixelLayout) -> bytes:
    """A frame as Explicit VR Little Endian pixels: byte-swapped from big endian, or decoded
    from its compressed syntax (only the one frame)."""
    if pixels.syntax in LITTLE_ENDIAN_NATIVE:
        return raw
    if pixels.syntax == BIG_ENDIAN:
        width = pixels.bits_allocated // 8
        if width <= 1 or pixels.vr == "OB":
            return raw
        return np.frombuffer(raw, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    decoder = get_decoder(pixels.syntax)
    options: dict[str, Any] = {**pixels.options, "number_of_frames": 1}
    arr, _props = decoder.as_array(encapsulate([raw]), index=0, **options)
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).tobytes()


# ---------------------------------------------------------------------------- transcoding


def can_decode(syntax: str) -> bool:
    if syntax in NATIVE_SYNTAXES:
        return True
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def can_transcode(stored: str, wanted: str) -> bool:
    """Whether ``stored`` can become ``wanted`` without losing anything beyond what is lost
    already: to uncompressed little endian from anything decodable, or to a lossless
    compressed syntax pydicom can encode."""
    if stored == wanted:
        return True
    if stored == BIG_ENDIAN or wanted == BIG_ENDIAN:
        return False  # retired; pydicom does not swap the pixel bytes when re-encoding
    if wanted in (EXPLICIT_VR_LE, IMPLICIT_VR_LE):
        return can_decode(stored)
    if wanted in LOSSLESS_ENCODABLE:
        try:
            return can_decode(stored) and bool(get_encoder(wanted).is_available)
        except NotImplementedError:
            return False
    return False


def transcode(data: bytes, wanted: str) -> bytes:
    """The Part-10 file ``data`` in transfer syntax ``wanted`` (``can_transcode`` said yes).
    Raises InstanceError when pydicom cannot (an encoder refusing these pixels)."""
    try:
        ds = dcmread(io.BytesIO(data))
        stored = str(ds.file_meta.TransferSyntaxUID)
        if stored == wanted:
            return data
        has_pixels = "PixelData" in ds
        if has_pixels and stored not in NATIVE_SYNTAXES:
            ds.decompress(generate_instance_uid=False)
        if wanted in LOSSLESS_ENCODABLE and has_pixels:
            ds.compress(wanted, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = UID(wanted)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()
    except Exception as exc:
        raise InstanceError(f"cannot transcode to {wanted}: {exc}") from exc
