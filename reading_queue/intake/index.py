"""The hub's DICOM attribute index: what QIDO-RS searches and answers with.

**Written with the instance.** ``entry_of`` takes the header the ingest path already parsed
(no second read of the file) and ``record`` writes the study, series and instance rows in the
caller's transaction, the one that records the ``hub_instances`` row: the index never holds
an instance the hub does not, nor misses one it stored. ``refresh_studies`` recomputes the
counts and ModalitiesInStudy from the *committed* instances, in the commit's transaction:
a study still arriving has nothing committed and no search shows it. ``reindex`` builds the
rows from the archive for instances stored before the index existed.

**Text is Unicode.** pydicom decodes each value with the file's Specific Character Set
(ISO_IR 192 UTF-8, Latin-1, ISO 2022 Japanese...); bytes that do not decode are replaced,
never refused: an index must not cost the hub an instance. Names and descriptions also get a
*key* (NFC, upper case; a person name without trailing empty components) that
case-insensitive matching compares.

**The query side** (``parse_query``, ``search``) turns QIDO-RS parameters into one SQL
statement: matching (the rules are in ``parse_query``'s docstring), the caller's access
as a SQL condition on the study UID (``visible``, from reading_queue.access), the committed
filter, order, limit and offset: a page is a page of what the caller may see. Malformed
queries raise ``QueryError`` with a message naming the parameter, never repeating a value
(it may be a patient's name).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import IntEnum
from typing import Any, Final

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue
from sqlalchemy import ColumnElement, Select, and_, exists, func, literal, or_, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, aliased, sessionmaker

from reading_queue import QueueError
from reading_queue.intake.archive import Archive, ArchiveError
from reading_queue.models import (
    DicomInstanceIndex,
    DicomSeriesIndex,
    DicomStudyIndex,
    HubInstance,
    HubStudy,
)
from telerad.core.identity import Identity, UndecodableError, read_header, uid_problem

logger = logging.getLogger(__name__)

# -- extraction ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntry:
    """One instance's index values, by column, for the three tables."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


def _lengths(model: Any) -> dict[str, int]:
    return {
        c.name: int(c.type.length)
        for c in model.__table__.columns
        if getattr(c.type, "length", None) is not None
    }


_MAX_LEN: Final = {
    DicomStudyIndex: _lengths(DicomStudyIndex),
    DicomSeriesIndex: _lengths(DicomSeriesIndex),
    DicomInstanceIndex: _lengths(DicomInstanceIndex),
}

_DATE: Final = re.compile(r"(\d{4})[.\-]?(\d{2})[.\-]?(\d{2})")
_INT: Final = re.compile(r"[+-]?\d{1,10}")


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # an element that does not decode: pydicom raises many kinds
        return None


def _text(ds: Dataset, keyword: str) -> str:
    """The value as text, multi-values joined with backslashes, padding removed."""
    value = _value(ds, keyword)
    if value is None:
        return ""
    try:
        if isinstance(value, MultiValue | list | tuple):
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
    except Exception:
        return ""
    return text.replace("\x00", "").strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None:
        return None
    if isinstance(value, int):
        return int(value)
    text = str(value).replace("\x00", "").strip()
    return int(text) if _INT.fullmatch(text) else None


def normalise_date(text: str) -> str:
    """DA as ``YYYYMMDD`` (also from the old ``YYYY.MM.DD``); anything else as it is."""
    m = _DATE.fullmatch(text)
    return "".join(m.groups()) if m else text


def normalise_time(text: str) -> str:
    """TM without the old-style colons (``09:30:15`` is ``093015``)."""
    return text.replace(":", "")


def text_key(value: str) -> str:
    """What case-insensitive matching compares: NFC, upper case, no outer spaces."""
    return unicodedata.normalize("NFC", value).upper().strip()


def name_key(value: str) -> str:
    """``text_key`` of a person name, each component group without trailing empty
    components (``DOE^JOHN^^`` is ``DOE^JOHN``), empty trailing groups dropped."""
    groups = [g.rstrip("^ ").strip() for g in text_key(value).split("=")]
    return "=".join(groups).rstrip("=")


def _cut(values: dict[str, Any], model: Any) -> dict[str, Any]:
    limits = _MAX_LEN[model]
    return {
        k: v[: limits[k]] if isinstance(v, str) and k in limits else v for k, v in values.items()
    }


def entry_of(ds: Dataset, ident: Identity) -> IndexEntry:
    """The index values of one header; never raises (a value that does not decode is
    empty). The UIDs come from ``ident``: what the hub files the instance under."""
    patient_name = _text(ds, "PatientName")
    referring = _text(ds, "ReferringPhysicianName")
    study_description = _text(ds, "StudyDescription")
    series_description = _text(ds, "SeriesDescription")
    study = {
        "patient_name": patient_name,
        "patient_name_key": name_key(patient_name),
        "patient_id": _text(ds, "PatientID"),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID"),
        "patient_birth_date": normalise_date(_text(ds, "PatientBirthDate")),
        "patient_sex": _text(ds, "PatientSex").upper(),
        "study_date": normalise_date(_text(ds, "StudyDate")),
        "study_time": normalise_time(_text(ds, "StudyTime")),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_description": study_description,
        "study_description_key": text_key(study_description),
        "referring_physician_name": referring,
        "referring_physician_key": name_key(referring),
        "study_id": _text(ds, "StudyID"),
    }
    series = {
        "modality": (ident.modality or _text(ds, "Modality")).upper(),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": series_description,
        "series_description_key": text_key(series_description),
        "series_date": normalise_date(_text(ds, "SeriesDate")),
        "series_time": normalise_time(_text(ds, "SeriesTime")),
        "body_part_examined": _text(ds, "BodyPartExamined").upper(),
    }
    instance = {
        "instance_number": _int(ds, "InstanceNumber"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "number_of_frames": _int(ds, "NumberOfFrames"),
        "transfer_syntax_uid": ident.transfer_syntax,
    }
    return IndexEntry(
        study_uid=ident.study_uid,
        series_uid=ident.series_uid,
        sop_instance_uid=ident.sop_instance_uid,
        study=_cut(study, DicomStudyIndex),
        series=_cut(series, DicomSeriesIndex),
        instance=_cut(instance, DicomInstanceIndex),
    )


# -- writing ------------------------------------------------------------------------------


def _blank(value: Any) -> bool:
    return value is None or value == ""


def _fill(row: Any, values: dict[str, Any]) -> None:
    """Later instances only fill what the first left blank: a study's attributes are its
    first instance's (as Orthanc keeps them), completed, never overwritten."""
    for key, value in values.items():
        if not _blank(value) and _blank(getattr(row, key)):
            setattr(row, key, value)


def record(s: Session, entries: Sequence[IndexEntry]) -> None:
    """Write the rows of ``entries`` in the caller's transaction (the one that records the
    instances). Counts are left to ``refresh_studies``, at commit."""
    if not entries:
        return
    studies: dict[str, dict[str, Any]] = {}
    series: dict[tuple[str, str], dict[str, Any]] = {}
    for e in entries:
        seen = studies.setdefault(e.study_uid, dict(e.study))
        for k, v in e.study.items():
            if _blank(seen[k]) and not _blank(v):
                seen[k] = v
        seen_series = series.setdefault((e.study_uid, e.series_uid), dict(e.series))
        for k, v in e.series.items():
            if _blank(seen_series[k]) and not _blank(v):
                seen_series[k] = v
    for uid, values in studies.items():
        row = s.get(DicomStudyIndex, uid)
        if row is None:
            s.add(
                DicomStudyIndex(
                    study_uid=uid, modalities="", series_count=0, instance_count=0, **values
                )
            )
        else:
            _fill(row, values)
    for (study_uid, series_uid), values in series.items():
        srow = s.get(DicomSeriesIndex, (study_uid, series_uid))
        if srow is None:
            s.add(
                DicomSeriesIndex(
                    study_uid=study_uid, series_uid=series_uid, instance_count=0, **values
                )
            )
        else:
            _fill(srow, values)
    for e in entries:
        s.merge(DicomInstanceIndex(sop_instance_uid=e.sop_instance_uid, **e.instance))


def refresh_studies(s: Session, study_uids: Iterable[str]) -> None:
    """Recompute counts and ModalitiesInStudy of ``study_uids`` from their committed,
    indexed instances (in the commit's transaction)."""
    for study_uid in dict.fromkeys(study_uids):
        s.flush()
        counts: dict[str, int] = {
            series_uid: int(n)
            for series_uid, n in s.execute(
                select(HubInstance.series_uid, func.count())
                .join(
                    DicomInstanceIndex,
                    DicomInstanceIndex.sop_instance_uid == HubInstance.sop_instance_uid,
                )
                .where(HubInstance.study_uid == study_uid, HubInstance.state == "committed")
                .group_by(HubInstance.series_uid)
            )
        }
        modalities: set[str] = set()
        n_series = n_instances = 0
        for srow in s.scalars(
            select(DicomSeriesIndex).where(DicomSeriesIndex.study_uid == study_uid)
        ):
            srow.instance_count = counts.get(srow.series_uid, 0)
            if srow.instance_count:
                n_series += 1
                n_instances += srow.instance_count
                if srow.modality:
                    modalities.add(srow.modality)
        study = s.get(DicomStudyIndex, study_uid)
        if study is not None:
            study.series_count = n_series
            study.instance_count = n_instances
            study.modalities = "\\".join(sorted(modalities))[:255]


# -- rebuilding from the archive ------------------------------------------------------------


@dataclass
class ReindexResult:
    indexed: int = 0
    studies: int = 0
    #: (SOP Instance UID, why): instances whose file could not be read; tried again next run
    failed: list[tuple[str, str]] = field(default_factory=list)


def _lacking() -> Select[str, str, str, str, str]:
    return (
        select(
            HubInstance.sop_instance_uid,
            HubInstance.study_uid,
            HubInstance.series_uid,
            HubInstance.sop_class_uid,
            HubInstance.archive_ref,
        )
        .outerjoin(
            DicomInstanceIndex,
            DicomInstanceIndex.sop_instance_uid == HubInstance.sop_instance_uid,
        )
        .where(DicomInstanceIndex.sop_instance_uid.is_(None))
    )


def count_unindexed(engine: Engine) -> int:
    """Instances the hub holds that the index lacks (stored before it existed)."""
    with engine.execution_options(read_only=True).connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(_lacking().subquery())) or 0)


def reindex(
    engine: Engine,
    archive: Archive,
    *,
    batch: int = 200,
    progress: Callable[[int], None] | None = None,
) -> ReindexResult:
    """Index every instance that lacks it, from its file in the archive; idempotent (an
    indexed instance is never read again). ``progress`` gets the number handled so far.
    Safe beside a running hub: each batch is one short transaction, and a commit recomputes
    its study's counts anyway. Run one at a time."""
    result = ReindexResult()
    touched: set[str] = set()
    sessions = sessionmaker(engine, expire_on_commit=False)
    reader = engine.execution_options(read_only=True)
    after = ""
    done = 0
    while True:
        with reader.connect() as conn:
            rows = conn.execute(
                _lacking()
                .where(HubInstance.sop_instance_uid > after)
                .order_by(HubInstance.sop_instance_uid)
                .limit(batch)
            ).all()
        if not rows:
            break
        after = rows[-1].sop_instance_uid
        entries: list[IndexEntry] = []
        for row in rows:
            try:
                data = archive.retrieve(row.archive_ref)
                header = read_header(data, decode=False)
            except (ArchiveError, UndecodableError, OSError) as exc:
                result.failed.append((row.sop_instance_uid, str(exc)[:200]))
                continue
            meta = getattr(header, "file_meta", None)
            syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            ident = Identity(
                sop_class_uid=row.sop_class_uid,
                sop_instance_uid=row.sop_instance_uid,
                study_uid=row.study_uid,
                series_uid=row.series_uid,
                transfer_syntax=syntax,
            )
            entries.append(entry_of(header, ident))
        if entries:
            studies = {e.study_uid for e in entries}
            with sessions.begin() as s:
                record(s, entries)
                refresh_studies(s, studies)
            result.indexed += len(entries)
            touched.update(studies)
        done += len(rows)
        if progress is not None:
            progress(done)
    result.studies = len(touched)
    for sop_uid, why in result.failed[:20]:
        logger.warning("reindex: %s not indexed: %s", sop_uid, why)
    return result


# -- the query side: attributes -----------------------------------------------------------


class Level(IntEnum):
    """Query levels, outermost first: a query may match and return attributes of its own
    level and of the levels above it."""

    STUDY = 0
    SERIES = 1
    INSTANCE = 2


class QueryError(QueueError, ValueError):
    """A QIDO-RS query that cannot be answered as asked (HTTP 400)."""


#: how a value is matched: uid (list), date/time (range), text (case-sensitive, wildcards),
#: key (case-insensitive on a *_key column, wildcards), code (CS: upper-cased, wildcards),
#: int (list), modalities (ModalitiesInStudy, via the study's committed series)
KINDS: Final = ("uid", "date", "time", "text", "key", "code", "int", "modalities")


@dataclass(frozen=True)
class Attribute:
    keyword: str
    tag: str
    vr: str
    level: Level
    kind: str
    model: Any
    column: str
    key: str = ""
    #: returned without being asked for (includefield)
    default: bool = True


def _a(
    keyword: str, vr: str, level: Level, kind: str, model: Any, column: str, **kw: Any
) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(keyword, f"{tag:08X}", vr, level, kind, model, column, **kw)


_S, _SE, _I = Level.STUDY, Level.SERIES, Level.INSTANCE
_ST, _SR, _IN, _HI = DicomStudyIndex, DicomSeriesIndex, DicomInstanceIndex, HubInstance

ATTRIBUTES: Final[tuple[Attribute, ...]] = (
    _a("StudyInstanceUID", "UI", _S, "uid", _ST, "study_uid"),
    _a("StudyDate", "DA", _S, "date", _ST, "study_date"),
    _a("StudyTime", "TM", _S, "time", _ST, "study_time"),
    _a("AccessionNumber", "SH", _S, "text", _ST, "accession_number"),
    _a("ModalitiesInStudy", "CS", _S, "modalities", _ST, "modalities"),
    _a("ReferringPhysicianName", "PN", _S, "key", _ST, "referring_physician_name",
       key="referring_physician_key"),
    _a("StudyDescription", "LO", _S, "key", _ST, "study_description", key="study_description_key"),
    _a("PatientName", "PN", _S, "key", _ST, "patient_name", key="patient_name_key"),
    _a("PatientID", "LO", _S, "text", _ST, "patient_id"),
    _a("IssuerOfPatientID", "LO", _S, "text", _ST, "issuer_of_patient_id", default=False),
    _a("PatientBirthDate", "DA", _S, "date", _ST, "patient_birth_date"),
    _a("PatientSex", "CS", _S, "code", _ST, "patient_sex"),
    _a("StudyID", "SH", _S, "text", _ST, "study_id"),
    _a("NumberOfStudyRelatedSeries", "IS", _S, "int", _ST, "series_count"),
    _a("NumberOfStudyRelatedInstances", "IS", _S, "int", _ST, "instance_count"),
    _a("SeriesInstanceUID", "UI", _SE, "uid", _SR, "series_uid"),
    _a("Modality", "CS", _SE, "code", _SR, "modality"),
    _a("SeriesNumber", "IS", _SE, "int", _SR, "series_number"),
    _a("SeriesDescription", "LO", _SE, "key", _SR, "series_description",
       key="series_description_key"),
    _a("SeriesDate", "DA", _SE, "date", _SR, "series_date"),
    _a("SeriesTime", "TM", _SE, "time", _SR, "series_time"),
    _a("BodyPartExamined", "CS", _SE, "code", _SR, "body_part_examined"),
    _a("NumberOfSeriesRelatedInstances", "IS", _SE, "int", _SR, "instance_count"),
    _a("SOPClassUID", "UI", _I, "uid", _HI, "sop_class_uid"),
    _a("SOPInstanceUID", "UI", _I, "uid", _HI, "sop_instance_uid"),
    _a("InstanceNumber", "IS", _I, "int", _IN, "instance_number"),
    _a("Rows", "US", _I, "int", _IN, "rows"),
    _a("Columns", "US", _I, "int", _IN, "columns"),
    _a("NumberOfFrames", "IS", _I, "int", _IN, "number_of_frames"),
    _a("AvailableTransferSyntaxUID", "UI", _I, "uid", _IN, "transfer_syntax_uid"),
)  # fmt: skip

BY_KEYWORD: Final = {a.keyword: a for a in ATTRIBUTES}
BY_TAG: Final = {a.tag: a for a in ATTRIBUTES}
#: query parameters that are not attributes (PS3.18 8.3.4)
CONTROL: Final = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
MAX_LIMIT: Final = 1000
#: UIDs in one list (SQL parameters)
MAX_UIDS: Final = 1000
_TAG: Final = re.compile(r"[0-9A-Fa-f]{8}")
_PARAM_NAME: Final = re.compile(r"[A-Za-z0-9_]{1,64}")


def safe_name(name: str) -> str:
    """A parameter name fit for messages and the audit trail: a mistyped key could be
    anything, even a patient's name."""
    if name in BY_KEYWORD or name in CONTROL or _TAG.fullmatch(name):
        return name
    if _PARAM_NAME.fullmatch(name) and tag_for_keyword(name) is not None:
        return name
    return "(unknown parameter)"


def resolve(name: str) -> Attribute | None:
    """The indexed attribute named by keyword or tag (``PatientID``, ``00100020``); None for
    a DICOM attribute the index does not hold; QueryError for anything else."""
    if name in BY_KEYWORD:
        return BY_KEYWORD[name]
    if _TAG.fullmatch(name):
        return BY_TAG.get(name.upper())
    if tag_for_keyword(name) is not None:
        return None
    raise QueryError(f"{safe_name(name)}: not a DICOM attribute keyword or tag")


# -- the query side: values ---------------------------------------------------------------

_ISO_OR_DA: Final = r"(\d{8}|\d{4}-\d{2}-\d{2})"
_DATE_ONE: Final = re.compile(_ISO_OR_DA)
_DATE_RANGE: Final = re.compile(f"{_ISO_OR_DA}?-{_ISO_OR_DA}?")
_TIME: Final = r"(\d{2}(?::?\d{2}(?::?\d{2}(?:\.\d{1,6})?)?)?)"
_TIME_ONE: Final = re.compile(_TIME)
_TIME_RANGE: Final = re.compile(f"{_TIME}?-{_TIME}?")


def _da(text: str, what: str) -> str:
    value = text.replace("-", "")
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        raise QueryError(f"{what}: not a calendar date (YYYYMMDD)") from None
    return value


def parse_date_range(text: str, what: str = "date") -> tuple[str | None, str | None]:
    """``YYYYMMDD``, ``YYYYMMDD-``, ``-YYYYMMDD``, ``YYYYMMDD-YYYYMMDD`` (each date also as
    ``YYYY-MM-DD``) as (from, to), inclusive, ``YYYYMMDD`` strings; None is open."""
    text = text.strip()
    if _DATE_ONE.fullmatch(text):
        one = _da(text, what)
        return one, one
    m = _DATE_RANGE.fullmatch(text)
    if m is None or (m.group(1) is None and m.group(2) is None):
        raise QueryError(f"{what}: use YYYYMMDD, YYYYMMDD-, -YYYYMMDD or YYYYMMDD-YYYYMMDD")
    lo = _da(m.group(1), what) if m.group(1) else None
    hi = _da(m.group(2), what) if m.group(2) else None
    if lo and hi and lo > hi:
        raise QueryError(f"{what}: the range ends before it starts")
    return lo, hi


def _tm(text: str, what: str, *, end: bool) -> str:
    digits = text.replace(":", "").split(".")[0]
    if (
        int(digits[:2]) > 23
        or (len(digits) >= 4 and int(digits[2:4]) > 59)
        or (len(digits) >= 6 and int(digits[4:6]) > 60)
    ):
        raise QueryError(f"{what}: not a time of day (HHMMSS)")
    # a partial time covers its whole hour or minute: 0930 is 09:30:00 to 09:30:59
    pad = "0000" if not end else "5959"
    return (digits + pad[len(digits) - 2 :])[:6] if len(digits) < 6 else digits[:6]


def parse_time_range(text: str, what: str = "time") -> tuple[str | None, str | None]:
    """``HH[MM[SS[.F]]]`` alone or in a range like dates, as (from, to) ``HHMMSS`` strings,
    inclusive; a partial time covers its hour or minute."""
    text = text.strip()
    if _TIME_ONE.fullmatch(text):
        return _tm(text, what, end=False), _tm(text, what, end=True)
    m = _TIME_RANGE.fullmatch(text)
    if m is None or (m.group(1) is None and m.group(2) is None):
        raise QueryError(f"{what}: use HHMMSS, HHMMSS-, -HHMMSS or HHMMSS-HHMMSS")
    lo = _tm(m.group(1), what, end=False) if m.group(1) else None
    hi = _tm(m.group(2), what, end=True) if m.group(2) else None
    if lo and hi and lo > hi:
        raise QueryError(f"{what}: the range ends before it starts")
    return lo, hi


def split_values(text: str, *, commas: bool) -> list[str]:
    """A DICOM multi-value (``a\\b``), or also a comma list (UIDs and codes, which cannot
    contain commas); empty parts dropped."""
    parts = re.split(r"[\\,]" if commas else r"\\", text)
    return [p.strip() for p in parts if p.strip()]


def has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def like_pattern(pattern: str) -> str:
    """A DICOM wildcard pattern (``*``, ``?``) as SQL LIKE with ``\\`` as the escape."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def glob_pattern(pattern: str) -> str:
    """A DICOM wildcard pattern as SQLite GLOB (case-sensitive, uses the index on a
    prefix): ``*`` and ``?`` mean the same; ``[`` must be escaped."""
    return pattern.replace("[", "[[]")


@dataclass(frozen=True)
class Criterion:
    """One matching key: the row matches if any of its values, patterns or ranges does."""

    attribute: Attribute
    values: tuple[Any, ...] = ()
    patterns: tuple[str, ...] = ()
    ranges: tuple[tuple[str | None, str | None], ...] = ()


def parse_criterion(attribute: Attribute, text: str) -> Criterion | None:
    """The criterion for ``attribute=text``; None for universal matching (empty or ``*``)."""
    what = attribute.keyword
    kind = attribute.kind
    if kind == "uid":
        uids = split_values(text, commas=True)
        if not uids:
            return None
        if len(uids) > MAX_UIDS:
            raise QueryError(f"{what}: at most {MAX_UIDS} UIDs in one query")
        for uid in uids:
            if has_wildcard(uid) or uid_problem(uid) is not None:
                raise QueryError(f"{what}: not a UID list (digits and dots, comma-separated)")
        return Criterion(attribute, values=tuple(dict.fromkeys(uids)))
    parts = split_values(text, commas=kind in ("code", "modalities", "int"))
    if not parts or "*" in parts:
        return None
    if kind == "date":
        return Criterion(attribute, ranges=tuple(parse_date_range(p, what) for p in parts))
    if kind == "time":
        return Criterion(attribute, ranges=tuple(parse_time_range(p, what) for p in parts))
    if kind == "int":
        try:
            return Criterion(attribute, values=tuple(int(p) for p in parts))
        except ValueError:
            raise QueryError(f"{what}: not an integer") from None
    if kind == "key":
        normal = name_key if attribute.vr == "PN" else text_key
        parts = [normal(p) for p in parts]
    elif kind in ("code", "modalities"):
        parts = [p.upper() for p in parts]
    values = tuple(p for p in parts if not has_wildcard(p))
    patterns = tuple(p for p in parts if has_wildcard(p))
    return Criterion(attribute, values=values, patterns=patterns)


@dataclass(frozen=True)
class Query:
    level: Level
    #: the outermost level whose attributes are returned by default: /series and /instances
    #: also return the study's (and series') attributes, /studies/{s}/series only the series'
    returns_from: Level
    study_uid: str | None = None
    series_uid: str | None = None
    criteria: tuple[Criterion, ...] = ()
    #: attributes asked for beyond the defaults; ``everything``: includefield=all
    include: frozenset[str] = frozenset()
    everything: bool = False
    limit: int = MAX_LIMIT
    offset: int = 0
    fuzzy: bool = False
    warnings: tuple[str, ...] = ()

    def returned(self) -> list[Attribute]:
        """The attributes of each answer, by tag."""
        out = [
            a
            for a in ATTRIBUTES
            if a.level <= self.level
            and (
                self.everything
                or a.keyword in self.include
                or (a.default and a.level >= self.returns_from)
            )
        ]
        uids = [BY_KEYWORD["StudyInstanceUID"], BY_KEYWORD["SeriesInstanceUID"]]
        out += [u for u in uids[: int(self.level)] if u not in out]
        return sorted(out, key=lambda a: a.tag)


def parse_includefield(
    values: Iterable[str], level: Level
) -> tuple[frozenset[str], bool, list[str]]:
    """includefield values (repeated, comma lists, ``all``) as (keywords, all, warnings).
    An unknown name is QueryError; a DICOM attribute the index does not hold, or one below
    the query level, is left out with a warning."""
    keywords: set[str] = set()
    everything = False
    warnings: list[str] = []
    for value in values:
        for name in (p.strip() for p in value.split(",")):
            if not name:
                continue
            if name == "all":
                everything = True
                continue
            attribute = resolve(name)
            if attribute is None:
                warnings.append(f"includefield {name}: not held in this hub's index")
            elif attribute.level > level:
                warnings.append(
                    f"includefield {name}: not available at the {level.name.lower()} level"
                )
            else:
                keywords.add(attribute.keyword)
    return frozenset(keywords), everything, warnings


def _non_negative(name: str, text: str) -> int:
    if not re.fullmatch(r"\d{1,9}", text.strip()):
        raise QueryError(f"{name}: not a non-negative integer")
    return int(text)


def parse_query(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    returns_from: Level | None = None,
) -> Query:
    """QIDO-RS query parameters (already percent-decoded) as a Query; QueryError if any is
    unknown or malformed.

    Matching (PS3.4 C.2.2.2, as this hub applies it):

    * empty value or ``*``: universal (no condition, the attribute is returned);
    * UIDs: a list, comma- or backslash-separated, no wildcards;
    * dates (DA) and times (TM): a value or a range ``a-b``, ``a-``, ``-b``; dates as
      ``YYYYMMDD`` or ``YYYY-MM-DD``; a partial time covers its hour or minute;
    * person names and descriptions: case-insensitive (NFC, upper case), ``*`` and ``?``;
    * codes (CS: Modality, PatientSex...): upper-cased, wildcards, comma/backslash list;
    * other text (PatientID, AccessionNumber, StudyID): exact, case-sensitive, wildcards;
    * integers (SeriesNumber, InstanceNumber...): a value or a list;
    * a backslash-separated value matches any of its parts; keys of different attributes
      must all match.

    Attributes of the query's level and the levels above it may be matched; one below it
    (``/studies?Modality=CT``: use ModalitiesInStudy) is refused, so is an attribute given
    twice.
    """
    if study_uid is not None and uid_problem(study_uid) is not None:
        raise QueryError("the study UID in the path is not a UID")
    if series_uid is not None and uid_problem(series_uid) is not None:
        raise QueryError("the series UID in the path is not a UID")
    criteria: list[Criterion] = []
    seen: set[str] = set()
    include_values: list[str] = []
    asked: set[str] = set()
    limit = MAX_LIMIT
    offset = 0
    fuzzy = False
    warnings: list[str] = []
    for name, value in params:
        if name == "includefield":
            include_values.append(value)
            continue
        if name in ("limit", "offset", "fuzzymatching") and name in seen:
            raise QueryError(f"{name}: given more than once")
        if name == "limit":
            seen.add(name)
            limit = _non_negative(name, value) or MAX_LIMIT
            if limit > MAX_LIMIT:
                warnings.append(f"limit {limit} lowered to this hub's maximum of {MAX_LIMIT}")
                limit = MAX_LIMIT
            continue
        if name == "offset":
            seen.add(name)
            offset = _non_negative(name, value)
            continue
        if name == "fuzzymatching":
            seen.add(name)
            if value.strip().lower() not in ("true", "false"):
                raise QueryError("fuzzymatching: true or false")
            fuzzy = value.strip().lower() == "true"
            continue
        attribute = resolve(name)
        if attribute is None:
            raise QueryError(f"{safe_name(name)}: this hub cannot search on that attribute")
        if attribute.keyword in seen:
            raise QueryError(f"{attribute.keyword}: given more than once")
        seen.add(attribute.keyword)
        if attribute.level > level:
            raise QueryError(
                f"{attribute.keyword}: a {attribute.level.name.lower()} attribute cannot be "
                f"matched at the {level.name.lower()} level"
                + (" (use ModalitiesInStudy)" if attribute.keyword == "Modality" else "")
            )
        asked.add(attribute.keyword)
        criterion = parse_criterion(attribute, value)
        if criterion is not None:
            criteria.append(criterion)
    include, everything, include_warnings = parse_includefield(include_values, level)
    if fuzzy:
        warnings.append(
            "The fuzzymatching parameter is not supported. Only literal matching has been "
            "performed."
        )
    return Query(
        level=level,
        returns_from=level if returns_from is None else returns_from,
        study_uid=study_uid,
        series_uid=series_uid,
        criteria=tuple(criteria),
        include=include | asked,
        everything=everything,
        limit=limit,
        offset=offset,
        fuzzy=fuzzy,
        warnings=tuple(warnings + include_warnings),
    )


# -- the query side: SQL ------------------------------------------------------------------


def _study_col(level: Level) -> Any:
    """The study UID column of the query's own table (the access rule applies to it)."""
    return {
        Level.STUDY: DicomStudyIndex.study_uid,
        Level.SERIES: DicomSeriesIndex.study_uid,
        Level.INSTANCE: HubInstance.study_uid,
    }[level]


def _column(attribute: Attribute, level: Level) -> Any:
    if attribute.keyword == "StudyInstanceUID":
        return _study_col(level)
    if attribute.keyword == "SeriesInstanceUID" and level is Level.INSTANCE:
        return HubInstance.series_uid
    return getattr(attribute.model, attribute.column)


def _wild(col: Any, pattern: str, dialect: str) -> ColumnElement[bool]:
    if dialect == "sqlite":  # LIKE there ignores ASCII case; GLOB is exact and indexed
        expr: ColumnElement[bool] = col.bool_op("GLOB")(glob_pattern(pattern))
        return expr
    return col.like(like_pattern(pattern), escape="\\")


def _text_match(col: Any, c: Criterion, dialect: str) -> ColumnElement[bool]:
    terms: list[ColumnElement[bool]] = []
    if c.values:
        terms.append(col.in_(list(c.values)) if len(c.values) > 1 else col == c.values[0])
    terms.extend(_wild(col, p, dialect) for p in c.patterns)
    return or_(*terms)


def condition(c: Criterion, level: Level, dialect: str) -> ColumnElement[bool]:
    """The SQL condition of one criterion in a query at ``level``."""
    a = c.attribute
    if a.kind == "modalities":
        series = aliased(DicomSeriesIndex)
        wanted = _text_match(series.modality, c, dialect)
        # correlated, not ``IN (every study with such a series)``: the search walks its
        # order's index and checks each row, instead of sorting all the matches
        return exists(
            select(series.study_uid).where(
                series.study_uid == _study_col(level), series.instance_count > 0, wanted
            )
        )
    if a.kind == "key":
        return _text_match(getattr(a.model, a.key), c, dialect)
    col = _column(a, level)
    if a.kind in ("uid", "int"):
        return col.in_(list(c.values)) if len(c.values) > 1 else col == c.values[0]
    if a.kind in ("date", "time"):
        value = func.substr(col.concat(literal("000000")), 1, 6) if a.kind == "time" else col
        terms = []
        for lo, hi in c.ranges:
            bounds: list[ColumnElement[bool]] = [col != ""]
            if lo is not None:
                bounds.append(value >= lo)
            if hi is not None:
                bounds.append(value <= hi)
            terms.append(and_(*bounds))
        return or_(*terms)
    return _text_match(col, c, dialect)


def _statement(
    q: Query, visible: Callable[[Any], ColumnElement[bool]], dialect: str
) -> Select[Any]:
    cols: list[Any] = []
    for a in ATTRIBUTES:
        if a.level <= q.level:
            cols.append(_column(a, q.level).label(a.keyword))
    stmt = select(*cols)
    # SQLite walks the StudyDate index to skip the sort: 1 ms when the first page fills
    # fast, a whole-table walk in index order (~0.2 s at 100,000 studies) when a substring
    # (OHIF sends every search as *value*) matches little. Sorting the matches costs
    # ~25 ms whatever matches: predictable wins, for patterns no index can serve.
    by_date: Any = DicomStudyIndex.study_date
    if dialect == "sqlite" and any(p[:1] in "*?" for c in q.criteria for p in c.patterns):
        by_date = by_date.concat("")
    study_order: list[Any] = [
        by_date.desc(),
        DicomStudyIndex.study_time.desc(),
        DicomStudyIndex.study_uid.desc(),
    ]
    series_order: list[Any] = [
        func.coalesce(DicomSeriesIndex.series_number, 2**31 - 1),
        DicomSeriesIndex.series_uid,
    ]
    if q.level is Level.STUDY:
        stmt = stmt.select_from(DicomStudyIndex).where(DicomStudyIndex.instance_count > 0)
        order = study_order
    elif q.level is Level.SERIES:
        stmt = (
            stmt.select_from(DicomSeriesIndex)
            .join(DicomStudyIndex, DicomStudyIndex.study_uid == DicomSeriesIndex.study_uid)
            .where(DicomSeriesIndex.instance_count > 0)
        )
        order = series_order if q.study_uid else study_order + series_order
    else:
        stmt = (
            stmt.select_from(HubInstance)
            .join(
                DicomInstanceIndex,
                DicomInstanceIndex.sop_instance_uid == HubInstance.sop_instance_uid,
            )
            .join(
                DicomSeriesIndex,
                and_(
                    DicomSeriesIndex.study_uid == HubInstance.study_uid,
                    DicomSeriesIndex.series_uid == HubInstance.series_uid,
                ),
            )
            .join(DicomStudyIndex, DicomStudyIndex.study_uid == HubInstance.study_uid)
            .where(HubInstance.state == "committed")
        )
        instance_order = [
            func.coalesce(DicomInstanceIndex.instance_number, 2**31 - 1),
            HubInstance.sop_instance_uid,
        ]
        order = (
            ([] if q.study_uid else study_order)
            + ([] if q.series_uid else series_order)
            + instance_order
        )
    study_col = _study_col(q.level)
    if q.study_uid is not None:
        stmt = stmt.where(study_col == q.study_uid)
    if q.series_uid is not None:
        series_col = (
            DicomSeriesIndex.series_uid if q.level is Level.SERIES else HubInstance.series_uid
        )
        stmt = stmt.where(series_col == q.series_uid)
    stmt = stmt.where(visible(study_col), *(condition(c, q.level, dialect) for c in q.criteria))
    return stmt.order_by(*order).offset(q.offset).limit(q.limit + 1)


@dataclass(frozen=True)
class SearchResult:
    #: each match: attribute keyword -> stored value (str, int or None)
    rows: list[dict[str, Any]]
    #: more matches than ``limit``: the caller may ask with a larger offset
    more: bool

    def study_uids(self) -> list[str]:
        return list(dict.fromkeys(r["StudyInstanceUID"] for r in self.rows))


def search(
    conn: Connection, q: Query, visible: Callable[[Any], ColumnElement[bool]]
) -> SearchResult:
    """One SQL statement: what ``q`` matches among the committed instances the caller may
    see (``visible``: reading_queue.access's condition on a study UID column)."""
    stmt = _statement(q, visible, conn.dialect.name)
    rows = [dict(r) for r in conn.execute(stmt).mappings()]
    return SearchResult(rows=rows[: q.limit], more=len(rows) > q.limit)


def scope_exists(
    conn: Connection,
    study_uid: str,
    series_uid: str | None,
    visible: Callable[[Any], ColumnElement[bool]],
) -> bool:
    """The study (and series) of a scoped query exists with committed instances and the
    caller may see it; False answers "missing" and "not yours" alike."""
    if series_uid is None:
        stmt: Select[Any] = select(DicomStudyIndex.study_uid).where(
            DicomStudyIndex.study_uid == study_uid,
            DicomStudyIndex.instance_count > 0,
            visible(DicomStudyIndex.study_uid),
        )
    else:
        stmt = select(DicomSeriesIndex.study_uid).where(
            DicomSeriesIndex.study_uid == study_uid,
            DicomSeriesIndex.series_uid == series_uid,
            DicomSeriesIndex.instance_count > 0,
            visible(DicomSeriesIndex.study_uid),
        )
    return conn.execute(stmt.limit(1)).first() is not None


def study_held(conn: Connection, study_uid: str) -> bool:
    """Whether the hub holds the study at all, whoever may see it: for the audit trail
    only (a refusal and a miss look the same to the caller)."""
    return (
        conn.execute(select(HubStudy.study_uid).where(HubStudy.study_uid == study_uid)).first()
        is not None
    )


__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "Criterion",
    "IndexEntry",
    "Level",
    "Query",
    "QueryError",
    "ReindexResult",
    "SearchResult",
    "count_unindexed",
    "entry_of",
    "name_key",
    "parse_criterion",
    "parse_date_range",
    "parse_includefield",
    "parse_query",
    "parse_time_range",
    "record",
    "refresh_studies",
    "reindex",
    "scope_exists",
    "search",
    "study_held",
    "text_key",
]
