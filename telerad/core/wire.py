"""Lossless wire codec for DICOM instances and the bundle file the gateway uploads to the hub.

Station links run at 1–10 Mbit/s, so every byte saved on the wire is upload time saved, while
the hub must be able to prove it received exactly what the modality sent (it checks the
SHA-256 of the restored Part-10 bytes against the gateway's manifest). The codec therefore
never touches the DICOM content: it splits the file bytes into the part before the pixel
value, the pixel value and the part after it, compresses native pixels with lossless JPEG-LS
(CharLS) and everything else with zstandard, and restores the original bytes exactly.

Instance blob layout (all integers little-endian)::

    header   magic "TRWI", version, method, flags, original size, CRC-32 of the original,
             CRC-32 of the whole blob except this field (checked before anything is decoded)
    RAW      the original bytes
    ZSTD     one zstd frame of the original bytes
    SPLIT    split header, [per-frame JPEG-LS lengths], zstd(prefix + suffix), pixel payload

Bundle layout::

    "TRWB" version 0 0 0
    entry*   "TRWE" header length (u32), payload length (u64), CRC-32 of header,
             header (compact JSON of BundleEntry), payload (instance blob)
    trailer  "TRWZ" entry count (u32), bytes before the trailer (u64), CRC-32 of those fields

Both are deterministic for a given input and library versions (single-threaded zstd at fixed
levels, CharLS lossless), so a resumed upload can rebuild the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO
from typing import Any, BinaryIO, Final

import jpeg_ls
import numpy as np
import zstandard
from pydicom import dcmread
from pydicom.uid import UID

logger = logging.getLogger(__name__)

__all__ = [
    "BundleEntry",
    "BundleStats",
    "WireFormatError",
    "decode_instance",
    "describe_blob",
    "encode_instance",
    "read_bundle",
    "write_bundle",
]


class WireFormatError(ValueError):
    """A blob or bundle is not what the writer produced: corrupt, truncated or foreign.

    Raised instead of ever returning bytes that differ from the original; callers reject the
    upload (and the gateway resends) rather than store a damaged instance.
    """


# --------------------------------------------------------------------------------------------
# Instance codec
# --------------------------------------------------------------------------------------------

_MAGIC: Final = b"TRWI"
_VERSION: Final = 1
# magic, version, method, flags, original size, CRC-32 of original, CRC-32 of blob
_HEADER: Final = struct.Struct("<4sBBHQII")
# prefix length, pixel length, zstd(prefix+suffix) length, pixel codec, JPEG-LS bit depth,
# bytes per sample, planar flag, rows, columns, frames, samples per pixel, reserved, offset
_SPLIT: Final = struct.Struct("<QQQBBBBHHIBBI")

_NATIVE_LE: Final = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
_EXPLICIT_VR_LE: Final = "1.2.840.10008.1.2.1"
_PIXEL_DATA_TAG: Final = b"\xe0\x7f\x10\x00"
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF

# Header bytes (prefix/suffix) are small and highly redundant: a slower level costs nothing.
_META_ZSTD_LEVEL: Final = 6
# Whole-file fallback can be megabytes of arbitrary content: stay fast.
_WHOLE_ZSTD_LEVEL: Final = 3
# Cheap probe that tells whether zstd beats JPEG-LS on pixels (repeated frames, synthetic art).
_PROBE_ZSTD_LEVEL: Final = 1
_PIXEL_ZSTD_LEVEL: Final = 6
# Whole-file zstd must save this fraction to be worth the decode step.
_MIN_WHOLE_SAVING: Final = 0.03
# Below this size every candidate encoding is tried, since trying is cheaper than guessing.
_SMALL_INSTANCE: Final = 64 * 1024


class _Method(IntEnum):
    RAW = 0
    ZSTD = 1
    SPLIT = 2


class _PixelCodec(IntEnum):
    STORED = 0
    ZSTD = 1
    JPEG_LS = 2


@dataclass(frozen=True)
class _NativePixels:
    """Where native little-endian pixel values sit in the file and how to read them."""

    start: int
    length: int  # bytes covered by rows*cols*frames*samples; a pad byte stays in the suffix
    rows: int
    columns: int
    frames: int
    samples: int
    bytes_per_sample: int
    signed: bool
    planar: bool


@dataclass(frozen=True)
class _EncapsulatedPixels:
    """Where an already-compressed Pixel Data element starts; it is sent as it is."""

    start: int


def encode_instance(data: bytes, *, verify: bool = False) -> bytes:
    """Return the smallest lossless wire blob for a DICOM Part-10 file (any bytes work).

    Native little-endian monochrome or 3-sample 8/16-bit pixels go through JPEG-LS; already
    compressed pixel data is kept as it is; anything unrecognised falls back to zstd or raw.
    With ``verify`` the blob is decoded again and, should that ever not give back ``data``,
    a plain zstd/raw blob is returned instead: a blob the hub cannot restore would otherwise
    be re-sent identically forever.
    """
    data = bytes(data)
    blob = _encode(data)
    if verify and not _restores(blob, data):
        logger.error(
            "wire codec self-check failed for a %d-byte instance (method %s); sending it whole",
            len(data),
            _Method(blob[5]).name,
        )
        blob = _encode_whole(data)
        if not _restores(blob, data):
            blob = _pack(_Method.RAW, data, [data])
    return blob


def decode_instance(blob: bytes) -> bytes:
    """Restore the exact original bytes from :func:`encode_instance` output.

    The blob checksum is checked before any decoder sees the payload, and the CRC-32 and size
    of the restored bytes are checked afterwards, so corruption raises instead of returning
    different bytes.
    """
    view = memoryview(bytes(blob))
    if len(view) < _HEADER.size:
        raise WireFormatError(f"wire blob too short ({len(view)} bytes)")
    magic, version, method, flags, size, crc, blob_crc = _HEADER.unpack_from(view)
    if magic != _MAGIC:
        raise WireFormatError("not a telerad wire blob (bad magic)")
    if version != _VERSION:
        raise WireFormatError(f"unsupported wire blob version {version}")
    if zlib.crc32(view[_HEADER.size :], zlib.crc32(view[: _HEADER.size - 4])) != blob_crc:
        raise WireFormatError("wire blob checksum mismatch (corrupted in transit or storage)")
    if flags != 0:
        raise WireFormatError(f"unsupported wire blob flags {flags:#x}")
    body = view[_HEADER.size :]
    try:
        if method == _Method.RAW:
            restored = bytes(body)
        elif method == _Method.ZSTD:
            restored = _unzstd(body, size)
        elif method == _Method.SPLIT:
            restored = _decode_split(body, size)
        else:
            raise WireFormatError(f"unknown wire method {method}")
    except WireFormatError:
        raise
    except Exception as exc:  # decoder libraries raise assorted types on bad input
        raise WireFormatError(f"wire blob could not be decoded: {exc}") from exc
    if len(restored) != size:
        raise WireFormatError(f"restored {len(restored)} bytes, header says {size}")
    if zlib.crc32(restored) != crc:
        raise WireFormatError("restored bytes fail the CRC-32 check")
    return restored


def describe_blob(blob: bytes) -> str:
    """Name the encoding a blob uses (``raw``, ``zstd``, ``split/jpeg-ls``, ...).

    For metrics labels and tests; reads only the headers and does not validate the blob.
    """
    if len(blob) < _HEADER.size or blob[:4] != _MAGIC:
        raise WireFormatError("not a telerad wire blob (bad magic)")
    try:
        method = _Method(blob[5])
        if method != _Method.SPLIT:
            return method.name.lower()
        codec = _PixelCodec(blob[_HEADER.size + 24])
    except (ValueError, IndexError) as exc:
        raise WireFormatError(f"unknown wire method in blob header: {exc}") from exc
    return f"split/{codec.name.lower().replace('_', '-')}"


def _restores(blob: bytes, data: bytes) -> bool:
    try:
        return decode_instance(blob) == data
    except WireFormatError:
        return False


def _encode(data: bytes) -> bytes:
    layout = _locate_pixels(data)
    if layout is None:
        return _encode_whole(data)
    try:
        blob = _encode_split(data, layout)
    except Exception:  # the gateway must never wedge on one odd instance: send it whole
        logger.exception("pixel split failed for a %d-byte instance; sending it whole", len(data))
        return _encode_whole(data)
    if len(data) <= _SMALL_INSTANCE:
        blob = min(blob, _encode_whole(data), key=len)  # ties keep the split
    if len(blob) > _HEADER.size + len(data):
        blob = _pack(_Method.RAW, data, [data])
    return blob


def _encode_whole(data: bytes) -> bytes:
    """Fallback for anything the pixel path does not understand."""
    packed = _zstd(data, _WHOLE_ZSTD_LEVEL)  # deflated or encrypted content stays raw
    if len(packed) < len(data) * (1 - _MIN_WHOLE_SAVING):
        return _pack(_Method.ZSTD, data, [packed])
    return _pack(_Method.RAW, data, [data])


def _pack(method: _Method, original: bytes, parts: Sequence[bytes | memoryview]) -> bytes:
    head = _HEADER.pack(_MAGIC, _VERSION, method, 0, len(original), zlib.crc32(original), 0)
    crc = zlib.crc32(head[:-4])
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([head[:-4], struct.pack("<I", crc), *parts])


def _zstd(data: bytes | memoryview, level: int) -> bytes:
    compressor = zstandard.ZstdCompressor(
        level=level, write_checksum=False, write_content_size=True, write_dict_id=False
    )
    return compressor.compress(data)


def _unzstd(frame: bytes | memoryview, expected: int) -> bytes:
    if zstandard.frame_content_size(frame) != expected:
        raise WireFormatError("zstd frame size does not match the wire header")
    out = zstandard.ZstdDecompressor().decompress(
        frame, max_output_size=expected, allow_extra_data=False
    )
    if len(out) != expected:
        raise WireFormatError("zstd frame decoded to the wrong size")
    return out


# --- locating the pixel value -----------------------------------------------------------------


def _locate_pixels(data: bytes) -> _NativePixels | _EncapsulatedPixels | None:
    """Find the top-level Pixel Data value; ``None`` means "no pixel path, send it whole".

    A wrong guess here can only cost compression, never correctness: the split is by byte
    offsets and every pixel codec is lossless on the bytes it is given.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    stream = BytesIO(data)
    try:
        ds = dcmread(stream, stop_before_pixels=True)
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    except Exception:  # unreadable header: let zstd handle the bytes as bytes
        return None
    pos = stream.tell()
    if data[pos : pos + 4] != _PIXEL_DATA_TAG or not ts:
        return None
    if ts not in _NATIVE_LE:
        if ts.is_transfer_syntax and ts.is_encapsulated:
            return _EncapsulatedPixels(start=pos)
        return None  # big endian, deflated, private: whole-file fallback

    if ts == _EXPLICIT_VR_LE:
        if data[pos + 4 : pos + 6] not in (b"OB", b"OW") or data[pos + 6 : pos + 8] != b"\0\0":
            return None
        (length,) = struct.unpack_from("<I", data, pos + 8)
        start = pos + 12
    else:
        if len(data) < pos + 8:
            return None
        (length,) = struct.unpack_from("<I", data, pos + 4)
        start = pos + 8
    if length == _UNDEFINED_LENGTH:
        return _EncapsulatedPixels(start=pos)

    rows = _int_attr(ds, "Rows")
    columns = _int_attr(ds, "Columns")
    frames = _int_attr(ds, "NumberOfFrames", 1)
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    bits_allocated = _int_attr(ds, "BitsAllocated")
    representation = _int_attr(ds, "PixelRepresentation", 0)
    planar = _int_attr(ds, "PlanarConfiguration", 0)
    if (
        rows is None
        or columns is None
        or frames is None
        or not (1 <= rows <= 0xFFFF and 1 <= columns <= 0xFFFF and 1 <= frames <= 0xFFFFFFFF)
        or samples not in (1, 3)
        or bits_allocated not in (8, 16)
        or representation not in (0, 1)
        or planar not in (0, 1)
    ):
        return None
    bytes_per_sample = bits_allocated // 8
    expected = rows * columns * frames * samples * bytes_per_sample
    if expected > length or start + length > len(data):
        return None
    return _NativePixels(
        start=start,
        length=expected,
        rows=rows,
        columns=columns,
        frames=frames,
        samples=samples,
        bytes_per_sample=bytes_per_sample,
        signed=representation == 1,
        planar=samples > 1 and planar == 1,
    )


def _int_attr(ds: Any, keyword: str, default: int | None = None) -> int | None:
    """An integer attribute, the default when absent/empty, ``None`` when unusable."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# --- split encoding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _PixelChoice:
    """The pixel codec chosen for one instance and what its decoder needs."""

    codec: _PixelCodec
    parts: list[bytes | memoryview]
    bits: int = 0  # JPEG-LS bit depth
    offset: int = 0  # minimum sample value, modulo the sample width
    lengths: tuple[int, ...] = ()  # JPEG-LS codestream length per frame


def _encode_split(data: bytes, layout: _NativePixels | _EncapsulatedPixels) -> bytes:
    view = memoryview(data)
    start = layout.start
    geometry = (0, 0, 0, 0, 0, 0)  # only JPEG-LS needs to know the image shape
    if isinstance(layout, _NativePixels):
        pixel_len = layout.length
        choice = _encode_native(view[start : start + pixel_len], layout)
        if choice.codec == _PixelCodec.JPEG_LS:
            geometry = (
                layout.bytes_per_sample,
                int(layout.planar),
                layout.rows,
                layout.columns,
                layout.frames,
                layout.samples,
            )
    else:
        pixel_len = len(data) - start
        choice = _PixelChoice(_PixelCodec.STORED, [view[start:]])
    meta = _zstd(b"".join([view[:start], view[start + pixel_len :]]), _META_ZSTD_LEVEL)
    split = _SPLIT.pack(
        start, pixel_len, len(meta), choice.codec, choice.bits, *geometry, 0, choice.offset
    )
    table = np.asarray(choice.lengths, dtype="<u4").tobytes()
    return _pack(_Method.SPLIT, data, [split, table, meta, *choice.parts])


def _encode_native(pixels: memoryview, layout: _NativePixels) -> _PixelChoice:
    """Pick the smallest of JPEG-LS, zstd and stored for the pixel bytes.

    Values are shifted by their minimum (modulo the sample width, so decoding never needs the
    signedness) to let JPEG-LS run at the smallest bit depth that holds the range: garbage
    above BitsStored and negative values cost ratio, never exactness.
    """
    bps = layout.bytes_per_sample
    kind = ("i" if layout.signed else "u") + str(bps)
    values = np.frombuffer(pixels, dtype=np.dtype(kind).newbyteorder("<"))
    low, high = int(values.min()), int(values.max())
    bits = max(2, (high - low).bit_length())
    unsigned = np.dtype(f"<u{bps}")
    offset = low & ((1 << (8 * bps)) - 1)
    shifted = values.view(unsigned)
    if offset:
        shifted = shifted - unsigned.type(offset)
    if bits <= 8 and bps == 2:
        shifted = shifted.astype(np.uint8)
    interleave = 0 if layout.samples == 1 or layout.planar else 2
    per_frame = layout.rows * layout.columns * layout.samples
    frames: list[bytes | memoryview] = []
    try:
        for index in range(layout.frames):
            frame = shifted[index * per_frame : (index + 1) * per_frame]
            encoded = jpeg_ls.encode_buffer(
                frame.tobytes(), layout.rows, layout.columns, layout.samples, bits, 0, interleave
            )
            frames.append(bytes(encoded))
    except (RuntimeError, ValueError):
        # CharLS gives up when noise-like data would expand past its output buffer.
        best = _PixelChoice(_PixelCodec.STORED, [pixels])
    else:
        lengths = tuple(len(frame) for frame in frames)
        best = _PixelChoice(_PixelCodec.JPEG_LS, frames, bits, offset, lengths)
    best_size = sum(len(part) for part in best.parts)

    probe = _zstd(pixels, _PROBE_ZSTD_LEVEL)
    if len(probe) < best_size:  # zstd wins on exact repeats: identical frames, synthetic art
        packed = _zstd(pixels, _PIXEL_ZSTD_LEVEL)
        packed = min(packed, probe, key=len)
        best, best_size = _PixelChoice(_PixelCodec.ZSTD, [packed]), len(packed)
    if len(pixels) <= best_size:
        best = _PixelChoice(_PixelCodec.STORED, [pixels])
    return best


# --- split decoding ---------------------------------------------------------------------------


def _decode_split(body: memoryview, size: int) -> bytes:
    if len(body) < _SPLIT.size:
        raise WireFormatError("split header truncated")
    (
        prefix_len,
        pixel_len,
        meta_len,
        codec,
        bits,
        bps,
        planar,
        rows,
        columns,
        frames,
        samples,
        _reserved,
        offset,
    ) = _SPLIT.unpack_from(body)
    if prefix_len + pixel_len > size:
        raise WireFormatError("split lengths exceed the original size")
    pos = _SPLIT.size
    lengths: list[int] = []
    if codec == _PixelCodec.JPEG_LS:
        if frames * 4 > len(body) - pos:
            raise WireFormatError("frame table truncated")
        lengths = np.frombuffer(body, dtype="<u4", count=frames, offset=pos).tolist()
        pos += frames * 4
    if pos + meta_len > len(body):
        raise WireFormatError("split metadata truncated")
    meta = _unzstd(body[pos : pos + meta_len], size - pixel_len)
    pos += meta_len
    payload = body[pos:]

    if codec == _PixelCodec.STORED:
        pixels: bytes | memoryview = payload
    elif codec == _PixelCodec.ZSTD:
        pixels = _unzstd(payload, pixel_len)
    elif codec == _PixelCodec.JPEG_LS:
        if sum(lengths) != len(payload):
            raise WireFormatError("JPEG-LS frame lengths do not add up to the payload")
        pixels = _decode_jpeg_ls(
            payload, lengths, bits, bps, bool(planar), rows, columns, samples, offset
        )
    else:
        raise WireFormatError(f"unknown pixel codec {codec}")
    if len(pixels) != pixel_len:
        raise WireFormatError("pixel payload decoded to the wrong size")
    return b"".join([meta[:prefix_len], pixels, meta[prefix_len:]])


def _decode_jpeg_ls(
    payload: memoryview,
    lengths: list[int],
    bits: int,
    bps: int,
    planar: bool,
    rows: int,
    columns: int,
    samples: int,
    offset: int,
) -> bytes:
    if bps not in (1, 2) or not 2 <= bits <= 8 * bps or samples not in (1, 3):
        raise WireFormatError("invalid JPEG-LS pixel description")
    unsigned = np.dtype(f"<u{bps}")
    coded = np.dtype("<u1" if bits <= 8 else "<u2")
    per_frame = rows * columns * samples
    interleave = 0 if samples == 1 or planar else 2
    out = np.empty(per_frame * len(lengths), dtype=unsigned)
    pos = 0
    for index, length in enumerate(lengths):
        image, info = jpeg_ls.decode_buffer(bytes(payload[pos : pos + length]))
        pos += length
        if (
            info["width"] != columns
            or info["height"] != rows
            or info["components"] != samples
            or info["bits_per_sample"] != bits
            or info["allowed_lossy_error"] != 0
            or (samples > 1 and info["interleave_mode"] != interleave)
            or len(image) != per_frame * coded.itemsize
        ):
            raise WireFormatError(f"JPEG-LS frame {index} does not match the wire header")
        out[index * per_frame : (index + 1) * per_frame] = np.frombuffer(image, dtype=coded)
    if offset:
        out += unsigned.type(offset)  # modular, undoes the encoder's shift exactly
    return out.tobytes()


# --------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------

_BUNDLE_MAGIC: Final = b"TRWB"
_BUNDLE_VERSION: Final = 1
_BUNDLE_HEAD: Final = struct.Struct("<4sB3s")  # magic, version, reserved (zero)
_ENTRY_MAGIC: Final = b"TRWE"
_ENTRY_HEAD: Final = struct.Struct("<4sIQI")  # magic, header length, payload length, header CRC
_TRAILER_MAGIC: Final = b"TRWZ"
_TRAILER: Final = struct.Struct("<4sIQI")  # magic, entry count, bytes before trailer, CRC
_MAX_ENTRY_HEADER: Final = 64 * 1024
_READ_CHUNK: Final = 16 * 1024 * 1024
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BundleEntry:
    """What the hub needs to file and verify one instance before decoding it."""

    sop_instance_uid: str
    study_instance_uid: str
    sha256: str  # hex digest of the ORIGINAL Part-10 bytes, as in the gateway manifest
    size: int  # length of the ORIGINAL Part-10 bytes

    def __post_init__(self) -> None:
        for name in ("sop_instance_uid", "study_instance_uid"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value) <= 64:
                raise ValueError(f"{name} must be a UID of 1-64 characters, got {value!r}")
        if not isinstance(self.sha256, str) or not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(
                f"sha256 of {self.sop_instance_uid} must be 64 lowercase hex characters"
            )
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"size of {self.sop_instance_uid} must be a non-negative int")

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "sha256": self.sha256,
                "size": self.size,
                "sop_instance_uid": self.sop_instance_uid,
                "study_instance_uid": self.study_instance_uid,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        ).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> BundleEntry:
        try:
            fields = json.loads(raw.decode("ascii"))
            return cls(
                sop_instance_uid=fields["sop_instance_uid"],
                study_instance_uid=fields["study_instance_uid"],
                sha256=fields["sha256"],
                size=fields["size"],
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise WireFormatError(f"unreadable bundle entry header: {exc}") from exc


@dataclass(frozen=True)
class BundleStats:
    """What one bundle cost on the wire, for progress bars and the compression metric."""

    raw_bytes: int  # sum of original instance sizes
    wire_bytes: int  # every byte written to the bundle, framing included
    count: int

    @property
    def ratio(self) -> float:
        """Wire bytes per raw byte (lower is better); 1.0 for an empty bundle."""
        return self.wire_bytes / self.raw_bytes if self.raw_bytes else 1.0


def write_bundle(
    dst: BinaryIO, entries: Iterable[tuple[BundleEntry, bytes]], *, verify: bool = True
) -> BundleStats:
    """Encode each instance and write the framed bundle, ending with the trailer.

    Each original is checked against its manifest entry first, so a spool file that changed
    on disk fails here, at the gateway, instead of as a hash mismatch at the hub. ``verify``
    decodes every blob once more before writing it (see :func:`encode_instance`); that costs
    a few ms per CT slice, far less than sending it.
    """
    written = _write(dst, _BUNDLE_HEAD.pack(_BUNDLE_MAGIC, _BUNDLE_VERSION, bytes(3)))
    raw_bytes = count = 0
    for entry, data in entries:
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise WireFormatError(
                f"instance {entry.sop_instance_uid} does not match its manifest size/sha256"
            )
        blob = encode_instance(data, verify=verify)
        header = entry.to_json()
        frame = _ENTRY_HEAD.pack(_ENTRY_MAGIC, len(header), len(blob), zlib.crc32(header))
        written += _write(dst, frame) + _write(dst, header) + _write(dst, blob)
        raw_bytes += entry.size
        count += 1
    trailer_fields = struct.pack("<4sIQ", _TRAILER_MAGIC, count, written)
    written += _write(dst, trailer_fields + struct.pack("<I", zlib.crc32(trailer_fields)))
    return BundleStats(raw_bytes=raw_bytes, wire_bytes=written, count=count)


def read_bundle(src: BinaryIO) -> Iterator[tuple[BundleEntry, bytes]]:
    """Yield (entry, original bytes) for each instance, each verified by size and SHA-256.

    Entries are yielded as they are verified, so a consumer may file them one by one; a
    truncated or tampered bundle still raises :class:`WireFormatError` when reached, after
    the good entries before it. Treat the bundle as complete only once iteration ends.
    """
    head = _read_exact(src, _BUNDLE_HEAD.size)
    if len(head) < _BUNDLE_HEAD.size or head[:4] != _BUNDLE_MAGIC:
        raise WireFormatError("not a telerad bundle (bad magic)")
    if head[4] != _BUNDLE_VERSION or head[5:] != bytes(3):
        raise WireFormatError(f"unsupported bundle version {head[4]} / flags {head[5:].hex()}")
    position = _BUNDLE_HEAD.size
    index = 0
    while True:
        frame = _read_exact(src, _ENTRY_HEAD.size)
        if frame[:4] == _TRAILER_MAGIC:
            _check_trailer(src, frame, index, position)
            return
        if len(frame) < _ENTRY_HEAD.size:
            raise WireFormatError(f"bundle truncated after {index} entries (no trailer)")
        magic, header_len, payload_len, header_crc = _ENTRY_HEAD.unpack(frame)
        if magic != _ENTRY_MAGIC:
            raise WireFormatError(f"bundle entry #{index} at byte {position}: bad entry magic")
        if header_len > _MAX_ENTRY_HEADER:
            raise WireFormatError(f"bundle entry #{index}: implausible header length")
        header = _read_exact(src, header_len)
        if len(header) < header_len:
            raise WireFormatError(f"bundle truncated in the header of entry #{index}")
        if zlib.crc32(header) != header_crc:
            raise WireFormatError(
                f"bundle entry #{index}: header corrupted (claims {_claimed_uid(header)})"
            )
        entry = BundleEntry.from_json(header)
        uid = entry.sop_instance_uid
        if payload_len > entry.size + _HEADER.size:
            raise WireFormatError(f"bundle entry #{index} ({uid}): implausible payload length")
        blob = _read_exact(src, payload_len)
        if len(blob) < payload_len:
            raise WireFormatError(f"bundle truncated in instance {uid} (entry #{index})")
        try:
            data = decode_instance(blob)
        except WireFormatError as exc:
            raise WireFormatError(f"instance {uid} (bundle entry #{index}): {exc}") from exc
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise WireFormatError(f"instance {uid} (bundle entry #{index}): sha256 mismatch")
        position += _ENTRY_HEAD.size + header_len + payload_len
        index += 1
        yield entry, data


def _check_trailer(src: BinaryIO, start: bytes, count: int, position: int) -> None:
    trailer = start + _read_exact(src, _TRAILER.size - len(start))
    if len(trailer) < _TRAILER.size:
        raise WireFormatError(f"bundle truncated in its trailer after {count} entries")
    _magic, expected_count, expected_position, crc = _TRAILER.unpack(trailer)
    if zlib.crc32(trailer[:-4]) != crc:
        raise WireFormatError("bundle trailer corrupted")
    if (expected_count, expected_position) != (count, position):
        raise WireFormatError(
            f"bundle trailer says {expected_count} entries / {expected_position} bytes, "
            f"read {count} / {position}"
        )
    if src.read(1):
        raise WireFormatError("unexpected data after the bundle trailer")


def _claimed_uid(header: bytes) -> str:
    """Best-effort UID from a damaged header, only to make the error message actionable."""
    match = re.search(rb'"sop_instance_uid":"([0-9.]{1,64})"', header)
    return f"SOP Instance UID {match.group(1).decode('ascii')}" if match else "no readable UID"


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes or up to EOF, in bounded chunks.

    Loops because raw streams may return short reads before EOF, and caps each read so that
    a corrupt length field cannot make us allocate gigabytes up front.
    """
    first = src.read(min(size, _READ_CHUNK))
    if len(first) == size or not first:
        return first
    chunks = bytearray(first)
    while len(chunks) < size:
        chunk = src.read(min(_READ_CHUNK, size - len(chunks)))
        if not chunk:
            break
        chunks += chunk
    return bytes(chunks)


def _write(dst: BinaryIO, data: bytes) -> int:
    dst.write(data)
    return len(data)
