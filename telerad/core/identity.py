"""DICOM identity: the UIDs and header fields every room files an instance by.

One module decides what a usable identity is, so that the gateway refuses at receive time
exactly what the hub would refuse later (a study the hub refuses forever must never reach
the forward queue). The SCP, recovery, the hub's unpack and DICOM inbox, and export all
read identities here.

The rule for UIDs (PS3.5 §9.1) as applied here:

* hard errors: empty, longer than 64 characters, any character other than ``0-9`` and
  ``.``, an empty component (leading, trailing or doubled dot). These break the wire
  format, paths and every peer we forward to.
* tolerated: components with a leading zero (``1.2.03``). Real modalities send them, they
  are harmless for filing, and refusing them would lose real studies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Final

from pydicom import Dataset, dcmread

UID_MAX_LENGTH: Final = 64
_UID_CHARS: Final = re.compile(r"[0-9.]+")
# The header is read from the first bytes only; long enough for every real header we have
# seen (private CT headers reach tens of KB), else the whole file is read.
HEADER_PROBE: Final = 256 * 1024


def uid_problem(value: object) -> str | None:
    """Why ``value`` is not a usable UID, or None when it is."""
    if not isinstance(value, str):
        return "not text"
    if not value:
        return "empty"
    if len(value) > UID_MAX_LENGTH:
        return f"{len(value)} characters long (at most {UID_MAX_LENGTH})"
    if not _UID_CHARS.fullmatch(value):
        return "contains characters other than digits and dots"
    if "" in value.split("."):
        return "has an empty component"
    return None


def is_uid(value: object) -> bool:
    return uid_problem(value) is None


def safe_uid(value: str) -> str:
    """``value`` if it is a usable UID, else ValueError: for paths and other sinks."""
    problem = uid_problem(value)
    if problem is not None:
        raise ValueError(f"not a usable UID ({problem}): {value[:80]!r}")
    return value


class IdentityError(ValueError):
    """The dataset cannot be filed. ``missing`` tells an absent UID from a malformed one."""

    def __init__(self, reason: str, *, field: str = "", missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.missing = missing
        #: Best-effort, printable, truncated: only to list the refused instance.
        self.sop_instance_uid = ""
        self.study_uid = ""


class UndecodableError(ValueError):
    """The header cannot be parsed or one of its elements cannot be decoded."""


@dataclass(frozen=True)
class Identity:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str = ""
    modality: str = ""
    body_part: str = ""


_UID_FIELDS: Final = (
    ("SOPClassUID", "sop_class_uid"),
    ("SOPInstanceUID", "sop_instance_uid"),
    ("StudyInstanceUID", "study_uid"),
    ("SeriesInstanceUID", "series_uid"),
)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip().rstrip("\x00").strip()


def _printable(ds: Dataset, keyword: str) -> str:
    try:
        value = _text(ds, keyword)
    except Exception:
        return ""
    return value if value.isprintable() and len(value) <= 80 else repr(value[:64])


def identity_of(ds: Dataset) -> Identity:
    """The identity of a parsed header; IdentityError names the first unusable field."""
    try:
        return _identity_of(ds)
    except IdentityError as exc:
        exc.sop_instance_uid = _printable(ds, "SOPInstanceUID")
        exc.study_uid = _printable(ds, "StudyInstanceUID")
        raise


def _identity_of(ds: Dataset) -> Identity:
    found: dict[str, str] = {}
    for keyword, name in _UID_FIELDS:
        try:
            value = _text(ds, keyword)
        except Exception as exc:  # an undecodable element: pydicom raises many kinds
            raise IdentityError(f"{keyword} cannot be decoded: {exc}", field=keyword) from exc
        if not value:
            raise IdentityError(f"{keyword} is missing", field=keyword, missing=True)
        problem = uid_problem(value)
        if problem is not None:
            raise IdentityError(
                f"{keyword} is not a valid UID ({problem}): {value[:80]!r}", field=keyword
            )
        found[name] = value
    try:
        modality = _text(ds, "Modality")
        body_part = _text(ds, "BodyPartExamined")
        meta = getattr(ds, "file_meta", None)
        tsyntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    except Exception as exc:
        raise IdentityError(f"header element cannot be decoded: {exc}") from exc
    return Identity(transfer_syntax=tsyntax, modality=modality, body_part=body_part, **found)


def decode_all(ds: Dataset) -> None:
    """Decode every header element now (pydicom decodes lazily): a corrupt element (an
    unknown VR, a broken sequence) is an UndecodableError here, not a crash later."""
    try:
        for elem in ds.iterall():
            _ = elem.value
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for elem in meta:
                _ = elem.value
    except Exception as exc:
        raise UndecodableError(str(exc) or type(exc).__name__) from exc


def read_header(data: bytes | memoryview, prefix: bytes = b"", *, decode: bool = True) -> Any:
    """Parse the header (everything before Pixel Data) of the Part-10 file ``prefix + data``
    from its first bytes only, falling back to the whole file when the probe ended before
    the header did. With ``decode`` every element is decoded (see :func:`decode_all`).
    Raises UndecodableError."""
    head = prefix + bytes(data[:HEADER_PROBE])
    ds: Any = None
    if len(data) > HEADER_PROBE:
        fp = BytesIO(head)
        try:
            probe = dcmread(fp, stop_before_pixels=True)
            if fp.tell() < len(head):  # stopped at Pixel Data, not at the end of the probe
                ds = probe
        except Exception:
            pass
        if ds is None:
            head = prefix + bytes(data)
    if ds is None:
        try:
            ds = dcmread(BytesIO(head), stop_before_pixels=True)
        except Exception as exc:
            raise UndecodableError(str(exc) or type(exc).__name__) from exc
    if decode:
        decode_all(ds)
    return ds


def read_identity(data: bytes | memoryview, prefix: bytes = b"") -> tuple[Any, Identity]:
    """The decoded header and identity of a Part-10 file; UndecodableError or IdentityError."""
    ds = read_header(data, prefix)
    return ds, identity_of(ds)
