"""The wire format of WADO-RS: ``Accept`` negotiation and ``multipart/related`` bodies.

Pure functions, no HTTP framework: the routes in ``wado`` and ``rendered`` use them, the unit
tests check them byte by byte.

Why this is spelled out instead of left to a library: the viewers are strict in odd ways
(FIELD-NOTES, DICOMweb/OHIF).

* Cornerstone's multipart parser takes the boundary from the first line of the body (so the
  body starts with ``--boundary``, no preamble), finds a part's type only in a header spelled
  exactly ``Content-Type:``, and takes the transfer syntax from that header's
  ``transfer-syntax=`` parameter, assuming Implicit VR Little Endian when it is missing. So
  every part carries ``Content-Type: <type>; transfer-syntax=<uid>``, always.
* A part ends with CRLF before the next delimiter (``\\r\\n--boundary``): Cornerstone cuts
  the two bytes before the delimiter off the frame.
* OHIF sends ``multipart/related; type="application/octet-stream"; transfer-syntax=*`` and,
  with ``omitQuotationForMultipartRequest``, the same without quotes; some clients put the
  transfer syntax inside the quoted type (``type="application/octet-stream;
  transfer-syntax=*"``). All three mean the same here.

Boundaries are derived from the response's ETag (``boundary_for``), so the same resource
always has the same bytes: a strong ETag and byte ranges stay honest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "CRLF",
    "DICOM",
    "DICOM_JSON",
    "EXPLICIT_VR_LE",
    "FRAME_MEDIA_TYPES",
    "JSON",
    "OCTET_STREAM",
    "AcceptError",
    "BulkChoice",
    "FrameChoice",
    "MediaRange",
    "NotAcceptable",
    "RetrieveChoice",
    "boundary_for",
    "closing",
    "content_type",
    "multipart_content_type",
    "multipart_length",
    "negotiate_bulk",
    "negotiate_frames",
    "negotiate_metadata",
    "negotiate_rendered",
    "negotiate_retrieve",
    "parse_accept",
    "part_header",
    "write_multipart",
]

CRLF: Final = b"\r\n"
#: RFC 2046: at most 70 characters; we use 8 + 40.
_BOUNDARY_PREFIX: Final = "telerad-"


class AcceptError(ValueError):
    """An ``Accept`` header (or ``accept=`` query value) that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One alternative of an ``Accept`` header: ``multipart/related; type=...;
    transfer-syntax=...; q=...``. Names are lower case, values unquoted; ``q`` is kept
    apart from ``params``."""

    media_type: str
    params: Mapping[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def is_multipart(self) -> bool:
        return self.media_type == "multipart/related"

    @property
    def part_type(self) -> str | None:
        """``type=`` of a multipart range (lower case), or None."""
        value = self.params.get("type")
        return value.lower() if value else None

    @property
    def transfer_syntax(self) -> str | None:
        """``transfer-syntax=`` as given (``*`` or a UID), or None."""
        value = self.params.get("transfer-syntax")
        return value if value else None

    def matches(self, media_type: str) -> bool:
        """Whether this range (``*/*``, ``image/*`` or exact) covers ``media_type``."""
        return _covers(self.media_type, media_type)


def _covers(pattern: str, media_type: str) -> bool:
    if pattern in ("*/*", "*"):
        return True
    if pattern.endswith("/*"):
        return media_type.split("/", 1)[0] == pattern[:-2]
    return pattern == media_type


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` where it is not inside a quoted string."""
    out: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            current.append(ch)
            quoted = not quoted
        elif ch == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise AcceptError(f"unbalanced quotes in {text!r}")
    out.append("".join(current))
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for ch in inner:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return value


def _parse_range(text: str) -> MediaRange | None:
    pieces = _split_outside_quotes(text, ";")
    media_type = pieces[0].strip().lower()
    if not media_type:
        if any(p.strip() for p in pieces[1:]):
            raise AcceptError(f"media range without a type: {text.strip()!r}")
        return None  # an empty alternative: "a, , b"
    if media_type != "*" and (media_type.count("/") != 1 or " " in media_type):
        raise AcceptError(f"not a media type: {media_type!r}")
    if media_type == "*":
        media_type = "*/*"  # a common client mistake, meant the same
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        if not piece.strip():
            continue
        name, sep, raw = piece.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise AcceptError(f"parameter {piece.strip()!r} is not name=value in {text.strip()!r}")
        value = _unquote(raw)
        if name == "q":
            try:
                q = float(value)
            except ValueError:
                raise AcceptError(f"q={value!r} is not a number") from None
            if not 0.0 <= q <= 1.0:
                raise AcceptError(f"q={value} is outside 0..1")
            continue
        params[name] = value
    # type="application/octet-stream; transfer-syntax=*": parameters inside the quoted type
    inner = params.get("type", "")
    if ";" in inner:
        head, *rest = _split_outside_quotes(inner, ";")
        params["type"] = head.strip()
        for extra in rest:
            name, sep, raw = extra.partition("=")
            if sep and name.strip():
                params.setdefault(name.strip().lower(), _unquote(raw))
    if "type" in params:
        params["type"] = params["type"].strip().lower()
        if params["type"] == "*":
            params["type"] = "*/*"
    if "transfer-syntax" in params:
        params["transfer-syntax"] = params["transfer-syntax"].strip()
    return MediaRange(media_type, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The alternatives of an ``Accept`` header, most preferred first: by q (stable, so
    equal q keeps the client's order), q=0 ("not acceptable") left out. An absent or empty
    header gives ``[]``: the caller applies the resource's default. Raises
    :class:`AcceptError` for what cannot be parsed."""
    if header is None or not header.strip():
        return []
    ranges = [r for r in (_parse_range(p) for p in _split_outside_quotes(header, ",")) if r]
    ordered = sorted(ranges, key=lambda r: -r.q)
    return [r for r in ordered if r.q > 0]


# ---------------------------------------------------------------------------- writing


def boundary_for(seed: str) -> str:
    """A boundary derived from ``seed`` (the response's ETag): 40 hex digits of its sha256.
    The chance that it occurs inside the parts is that of guessing a 160-bit hash."""
    return _BOUNDARY_PREFIX + hashlib.sha256(seed.encode()).hexdigest()[:40]


def content_type(media_type: str, transfer_syntax: str | None = None) -> str:
    """A part's type: ``image/jls; transfer-syntax=1.2.840.10008.1.2.4.80``."""
    if transfer_syntax:
        return f"{media_type}; transfer-syntax={transfer_syntax}"
    return media_type


def multipart_content_type(part_type: str, boundary: str) -> str:
    """The response's ``Content-Type``. The boundary is a token (letters, digits, ``-``), so
    it needs no quotes, which naive parsers (dicomweb-client splits at ``;``) prefer."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def part_header(
    boundary: str,
    part_content_type: str,
    *,
    first: bool,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Everything before a part's body. Not the first part: the CRLF ending the previous
    part's body comes first (it belongs to the delimiter, RFC 2046 §5.1.1)."""
    lines = [f"--{boundary}", f"Content-Type: {part_content_type}"]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    head = "\r\n".join(lines).encode("ascii") + CRLF + CRLF
    return head if first else CRLF + head


def closing(boundary: str, *, empty: bool = False) -> bytes:
    """The close delimiter; ``empty``: no part was written (then no CRLF before it)."""
    return (b"" if empty else CRLF) + f"--{boundary}--".encode("ascii") + CRLF


def write_multipart(
    boundary: str, parts: Iterable[tuple[str, bytes | memoryview]]
) -> Iterator[bytes | memoryview]:
    """The body, piece by piece: for each ``(content type, body)`` its header, then its
    body; then the close delimiter. Nothing is joined, so a 60 MB study streams."""
    first = True
    for part_ct, body in parts:
        yield part_header(boundary, part_ct, first=first)
        yield body
        first = False
    yield closing(boundary, empty=first)


def multipart_length(boundary: str, parts: Iterable[tuple[str, int]]) -> int:
    """The body length ``write_multipart`` will produce for parts of these sizes."""
    total = 0
    first = True
    for part_ct, size in parts:
        total += len(part_header(boundary, part_ct, first=first)) + size
        first = False
    return total + len(closing(boundary, empty=first))


# ---------------------------------------------------------------------------- negotiation

EXPLICIT_VR_LE: Final = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE: Final = "1.2.840.10008.1.2"
BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
DEFLATED: Final = "1.2.840.10008.1.2.1.99"
#: Pixel data not encapsulated: frames are slices of the value.
NATIVE_SYNTAXES: Final = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE, BIG_ENDIAN, DEFLATED})
#: Native syntaxes whose pixel bytes are already little endian as stored (deflate is
#: undone when the file is read).
LITTLE_ENDIAN_NATIVE: Final = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE, DEFLATED})

OCTET_STREAM: Final = "application/octet-stream"
DICOM: Final = "application/dicom"
DICOM_JSON: Final = "application/dicom+json"
JSON: Final = "application/json"

#: The media types of compressed frames and the transfer syntaxes each may carry (PS3.18
#: Table 8.7.3-2), the first being the type's default. ``image/x-jls`` and
#: ``image/dicom-rle`` are the spellings dicomweb-client and older servers use.
FRAME_MEDIA_TYPES: Final[Mapping[str, tuple[str, ...]]] = {
    "image/jpeg": (
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
    ),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/x-jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
    "image/x-dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "video/mpeg2": ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101"),
    "video/mp4": (
        "1.2.840.10008.1.2.4.102",
        "1.2.840.10008.1.2.4.103",
        "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105",
        "1.2.840.10008.1.2.4.106",
    ),
}
#: The type a stored compressed syntax is labelled with when a client asked for ``image/*``.
_PREFERRED_TYPE: Final = {
    syntax: media_type
    for media_type, syntaxes in reversed(list(FRAME_MEDIA_TYPES.items()))
    for syntax in syntaxes
    if not media_type.startswith(("image/x-", "image/dicom-"))
}


def _wildcard_types(pattern: str) -> list[str]:
    return [t for t in FRAME_MEDIA_TYPES if _covers(pattern, t)]


@dataclass(frozen=True, slots=True)
class FrameChoice:
    """How frames are answered: each part ``media_type; transfer-syntax=transfer_syntax``;
    ``convert``: the frames are decoded (or byte-swapped) to Explicit VR Little Endian
    pixels, otherwise sent as stored; ``multipart``: else one single-part body."""

    media_type: str
    transfer_syntax: str
    convert: bool
    multipart: bool = True


class NotAcceptable(ValueError):
    """Nothing in the Accept header can be served; the message says what could be."""


def _stored_label(stored: str) -> str:
    # Deflate is undone on reading: the bytes handed out are plain little endian pixels.
    return EXPLICIT_VR_LE if stored == DEFLATED else stored


def _frame_option(
    part: str, syntax: str | None, stored: str, decodable: bool, multipart: bool
) -> FrameChoice | None:
    """One alternative's answer for frames stored in ``stored``, or None."""
    native = stored in NATIVE_SYNTAXES
    as_stored = FrameChoice(OCTET_STREAM, _stored_label(stored), False, multipart)
    uncompressed: FrameChoice | None = None
    if stored in LITTLE_ENDIAN_NATIVE:
        uncompressed = FrameChoice(OCTET_STREAM, EXPLICIT_VR_LE, False, multipart)
    elif stored == BIG_ENDIAN or decodable:
        uncompressed = FrameChoice(OCTET_STREAM, EXPLICIT_VR_LE, True, multipart)
    if part in ("*/*", "application/*"):
        if syntax in (None, "*") or syntax == stored:
            return as_stored
        if syntax in (EXPLICIT_VR_LE, IMPLICIT_VR_LE):
            return uncompressed
        return None
    if part == OCTET_STREAM:
        if syntax == "*" or syntax == stored:
            return as_stored
        if syntax in (None, EXPLICIT_VR_LE, IMPLICIT_VR_LE):
            return uncompressed
        return None
    types = _wildcard_types(part) if part.endswith("/*") else [part]
    for media_type in types:
        allowed = FRAME_MEDIA_TYPES.get(media_type, ())
        if native or stored not in allowed:
            continue
        if syntax in (None, "*") or syntax == stored:
            label = _PREFERRED_TYPE.get(stored, media_type) if part.endswith("/*") else part
            return FrameChoice(label, stored, False, multipart)
    return None


def negotiate_frames(
    ranges: list[MediaRange], stored: str, *, decodable: bool, single: bool
) -> FrameChoice:
    """The first alternative of ``ranges`` the stored syntax satisfies, for frames (and Pixel
    Data bulk data). ``decodable``: a decoder for ``stored`` is installed; ``single``: one
    frame is asked for, so a single-part answer is possible.

    No Accept (``[]``) or a bare ``*/*`` is PS3.18's default: ``multipart/related;
    type="application/octet-stream"`` in Explicit VR Little Endian, decoding if need be.
    Frames are never re-encoded into another compressed syntax."""
    options = ranges or [MediaRange("multipart/related", {"type": OCTET_STREAM})]
    for r in options:
        if r.is_multipart:
            part, multipart = r.part_type or OCTET_STREAM, True
        elif r.media_type == "*/*":
            part, multipart = OCTET_STREAM, True
        elif single:
            part, multipart = r.media_type, False
        else:
            continue
        choice = _frame_option(part, r.transfer_syntax, stored, decodable, multipart)
        if choice is not None:
            return choice
    raise NotAcceptable(_frames_hint(stored, decodable))


def _frames_hint(stored: str, decodable: bool) -> str:
    offers = [f'multipart/related; type="{OCTET_STREAM}"; transfer-syntax=*']
    if stored not in NATIVE_SYNTAXES:
        offers += [
            f'multipart/related; type="{t}"' for t in FRAME_MEDIA_TYPES if stored in
            FRAME_MEDIA_TYPES[t] and not t.startswith(("image/x-", "image/dicom-"))
        ]  # fmt: skip
    if stored in NATIVE_SYNTAXES or decodable:
        offers.append(f'multipart/related; type="{OCTET_STREAM}" (Explicit VR Little Endian)')
    offered = ", ".join(offers)
    return f"the frames are stored as {stored} and are not re-encoded; acceptable: {offered}"


@dataclass(frozen=True, slots=True)
class RetrieveChoice:
    """How instances are answered: ``transfer_syntax`` None: each as stored (its part
    labelled with its own syntax), else every instance in that syntax; ``multipart``: else
    one ``application/dicom`` body (one instance only)."""

    transfer_syntax: str | None
    multipart: bool = True


def negotiate_retrieve(
    ranges: list[MediaRange],
    stored: Iterable[str],
    *,
    can_transcode: Callable[[str, str], bool],
    single: bool,
) -> RetrieveChoice:
    """The first alternative of ``ranges`` for instances stored in the syntaxes ``stored``.

    Without ``transfer-syntax`` (or with ``*``) the instances go as stored, like Orthanc and
    dcm4chee do; PS3.18's default would be Explicit VR Little Endian, which would decompress
    every compressed study for clients (dicomweb-client, Weasis) that never asked for it. A
    specific syntax is served when every instance is stored in it or ``can_transcode(stored,
    wanted)`` (losslessly) says it can be made."""
    syntaxes = set(stored)
    options = ranges or [MediaRange("multipart/related", {"type": DICOM})]
    reasons: list[str] = []
    for r in options:
        if r.is_multipart:
            part, multipart = r.part_type or DICOM, True
        elif r.media_type == "*/*":
            part, multipart = DICOM, True
        elif r.media_type == DICOM:
            if not single:
                reasons.append("a single-part application/dicom answer holds one instance only")
                continue
            part, multipart = DICOM, False
        else:
            continue
        if part not in (DICOM, "*/*", "application/*"):
            continue
        wanted = r.transfer_syntax
        if wanted in (None, "*"):
            return RetrieveChoice(None, multipart)
        if syntaxes <= {wanted}:
            return RetrieveChoice(wanted, multipart)
        cannot = sorted(s for s in syntaxes if s != wanted and not can_transcode(s, wanted))
        if not cannot:
            return RetrieveChoice(wanted, multipart)
        reasons.append(f"cannot make {wanted} losslessly from {', '.join(cannot)}")
    stored_list = ", ".join(sorted(syntaxes)) or "nothing"
    why = ("; ".join(dict.fromkeys(reasons)) + "; ") if reasons else ""
    raise NotAcceptable(
        f"{why}stored as {stored_list}; acceptable: multipart/related; "
        f'type="{DICOM}" with transfer-syntax=* (as stored), Explicit VR Little Endian '
        f"({EXPLICIT_VR_LE}) or a lossless syntax this hub can encode"
    )


def negotiate_metadata(ranges: list[MediaRange]) -> str:
    """``application/dicom+json`` (default) or ``application/json``, as asked; XML is not
    offered."""
    if not ranges:
        return DICOM_JSON
    for r in ranges:
        if r.media_type == DICOM_JSON or r.media_type in ("*/*", "application/*"):
            return DICOM_JSON
        if r.media_type == JSON:
            return JSON
        if r.is_multipart and r.part_type in (DICOM_JSON, None):
            return DICOM_JSON
    raise NotAcceptable(
        "metadata is served as application/dicom+json (or application/json); "
        "application/dicom+xml is not offered"
    )


RENDERED_TYPES: Final = ("image/jpeg", "image/png")


def negotiate_rendered(ranges: list[MediaRange]) -> str:
    """``image/jpeg`` (default, also for ``image/*`` and ``*/*``) or ``image/png``."""
    if not ranges:
        return RENDERED_TYPES[0]
    for r in ranges:
        if r.media_type in RENDERED_TYPES:
            return r.media_type
        if r.media_type in ("*/*", "image/*"):
            return RENDERED_TYPES[0]
    raise NotAcceptable(f"rendered images are offered as {' or '.join(RENDERED_TYPES)}")


@dataclass(frozen=True, slots=True)
class BulkChoice:
    multipart: bool


def negotiate_bulk(ranges: list[MediaRange]) -> BulkChoice:
    """Bulk data (not Pixel Data, which is answered as its frames): ``multipart/related;
    type=application/octet-stream`` by default, a single ``application/octet-stream`` body
    when asked for (that one honours ``Range``)."""
    if not ranges:
        return BulkChoice(True)
    for r in ranges:
        if r.is_multipart and r.part_type in (None, OCTET_STREAM, "*/*", "application/*"):
            return BulkChoice(True)
        if r.media_type == "*/*":
            return BulkChoice(True)
        if r.media_type in (OCTET_STREAM, "application/*"):
            return BulkChoice(False)
    raise NotAcceptable(
        f'bulk data is offered as multipart/related; type="{OCTET_STREAM}" or {OCTET_STREAM}'
    )
