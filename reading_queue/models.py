"""Hub tables (SQLAlchemy 2.0): ingest (stations, uploads, instances) and the reading worklist.

Times are epoch seconds (float) throughout, like the gateway's state database. Patient
identity lives in ``studies`` only, for matching priors and stickiness; it is never logged.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Station(Base):
    __tablename__ = "stations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: sha256 of the bearer token; the token itself is shown once, at creation.
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(default=True)
    institution: Mapped[str] = mapped_column(String(128), default="", server_default="")
    #: ISO 3166 country or subdivision (``VN``, ``VN-HN``, ``KH-12``): who may read its studies
    jurisdiction: Mapped[str] = mapped_column(String(16), default="", server_default="")
    #: ISO 639-1 language its reports are written in
    language: Mapped[str] = mapped_column(String(8), default="", server_default="")
    preferred: Mapped[list[str]] = mapped_column(JSON, default=list)
    excluded: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: contract SLAs in minutes per priority name, overriding the hub policy
    sla_minutes: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    #: hospital PACS that receive its reports: [{name, aet, host, port}]
    pacs: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class DicomSource(Base):
    """A caller allowed on the hub's own DICOM port (a hospital PACS, a modality sending
    straight to the hub), and the station its studies belong to: that station's jurisdiction,
    language and SLA apply. Unknown callers are rejected at association."""

    __tablename__ = "dicom_sources"
    __table_args__ = (UniqueConstraint("aet", "host"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    aet: Mapped[str] = mapped_column(String(16))
    #: the caller's address; empty: any address
    host: Mapped[str] = mapped_column(String(255), default="", server_default="")
    station: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class User(Base):
    """A person who signs in: a radiologist (bound to a roster key), a clinic user (bound to
    one station) or an admin. Only an argon2id hash of the password is kept."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    #: radiologist | clinic | admin
    role: Mapped[str] = mapped_column(String(16))
    radiologist: Mapped[str | None] = mapped_column(String(64), nullable=True)
    station: Mapped[str | None] = mapped_column(String(64), nullable=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class AuthSession(Base):
    """One sign-in: a short-lived access token and its refresh token, kept as sha256 only.
    Refreshing rotates both; disabling the user or a new password revokes every session."""

    __tablename__ = "auth_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    access_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    refresh_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    access_expires_at: Mapped[float] = mapped_column(Float)
    refresh_expires_at: Mapped[float] = mapped_column(Float)
    address: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Upload(Base):
    """A tus upload of one bundle; ``offset`` counts bytes durable in ``path``."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("station_id", "bundle_sha256"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    station_id: Mapped[int] = mapped_column(ForeignKey("stations.id"))
    study_uid: Mapped[str] = mapped_column(String(64))
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    length: Mapped[int] = mapped_column(BigInteger)
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    #: receiving -> processed | failed
    state: Mapped[str] = mapped_column(String(16), default="receiving")
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class HubStudy(Base):
    __tablename__ = "hub_studies"
    #: a clinic's searches filter on its station
    __table_args__ = (Index("ix_hub_studies_station", "station"),)
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    station: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    priority: Mapped[int] = mapped_column(Integer, default=2)
    #: receiving (instances arriving) -> committed (complete, handed to the reading queue)
    state: Mapped[str] = mapped_column(String(16), default="receiving")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    first_received: Mapped[float] = mapped_column(Float)
    committed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    commit_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Instances the sender could not forward for good, as it said at commit (0: whole).
    missing_instances: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    missing_reason: Mapped[str] = mapped_column(String(500), default="", server_default="")
    #: When the sender (station gateway, the hub's own DICOM port) received its first
    #: instance, in the hub's clock (see ``StudyMeta.received_age_s``); None: not told.
    station_received_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class HubInstance(Base):
    __tablename__ = "hub_instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    station: Mapped[str] = mapped_column(String(64))
    archive_ref: Mapped[str] = mapped_column(String(255))
    #: received (held, study not yet committed) -> committed
    state: Mapped[str] = mapped_column(String(16), default="received")
    received_at: Mapped[float] = mapped_column(Float)
    committed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class StudyEvent(Base):
    """Append-only outbox of hub events; the reading queue consumes ``study_received``."""

    __tablename__ = "study_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[float] = mapped_column(Float)
    consumed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class HubConflict(Base):
    """Different content arrived under a SOP Instance UID the hub already holds."""

    __tablename__ = "hub_conflicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64))
    station: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[float] = mapped_column(Float)


# -- reading worklist ------------------------------------------------------------------------


class Radiologist(Base):
    __tablename__ = "radiologists"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    modalities: Mapped[list[str]] = mapped_column(JSON, default=list)
    subspecialties: Mapped[list[str]] = mapped_column(JSON, default=list)
    licences: Mapped[list[str]] = mapped_column(JSON, default=list)
    languages: Mapped[list[str]] = mapped_column(JSON, default=list)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    #: [{days, start, end, on_call}] as in the roster file
    shifts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    max_concurrent: Mapped[int] = mapped_column(Integer, default=4)
    rvu_per_hour: Mapped[float] = mapped_column(Float, default=8.0)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Study(Base):
    """A study on the worklist; ``state`` follows engine.StudyState, changed only by
    ``UPDATE ... WHERE state = :expected`` (see worklist.py)."""

    __tablename__ = "studies"
    __table_args__ = (
        # claims read candidates in (deadline, study_uid) order: keyset pages, no sort
        Index("ix_studies_state_deadline", "state", "deadline", "study_uid"),
        Index("ix_studies_assignee_state", "assignee", "state"),
        # every round sums each reader's RVU over the last hours: without it, a scan of
        # the whole history (~70 ms at 100,000 studies on SQLite, every round)
        Index("ix_studies_reported_at", "reported_at", "assignee", "rvu"),
    )
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    accession: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    description: Mapped[str] = mapped_column(String(128), default="")
    subspecialty: Mapped[str] = mapped_column(String(32), default="")
    rvu: Mapped[float] = mapped_column(Float, default=0.0)
    station: Mapped[str] = mapped_column(String(64), default="")
    institution: Mapped[str] = mapped_column(String(128), default="")
    jurisdiction: Mapped[str] = mapped_column(String(16), default="")
    language: Mapped[str] = mapped_column(String(8), default="")
    priority: Mapped[int] = mapped_column(Integer, default=2)
    received_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="received")
    assignee: Mapped[str | None] = mapped_column(String(64), nullable=True)
    assigned_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    escalated_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    #: set when a follow-up commit added instances after the study was handed out
    late_instances: Mapped[int] = mapped_column(Integer, default=0)
    #: Instances the station could not deliver: the study is read knowing it is incomplete.
    missing_instances: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    merged_into: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: patient identity (PHI): for priors and stickiness, never logged
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(192), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    #: sha256 of issuer + patient ID: what the engine sees
    patient_key: Mapped[str] = mapped_column(String(64), default="", index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[float] = mapped_column(Float)


class Assignment(Base):
    """Who held a study when; at most one open (``ended_at IS NULL``) per study."""

    __tablename__ = "assignments"
    __table_args__ = (
        Index(
            "ux_assignments_open",
            "study_uid",
            unique=True,
            sqlite_where=text("ended_at IS NULL"),
            postgresql_where=text("ended_at IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    radiologist: Mapped[str] = mapped_column(String(64), index=True)
    #: push | pull | manual
    mode: Mapped[str] = mapped_column(String(8))
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    assigned_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: reported | lease_expired | shift_end | released | reassigned | cancelled | ...
    end_reason: Mapped[str] = mapped_column(String(32), default="")


class WorklistEvent(Base):
    """Append-only history of every transition (database triggers refuse UPDATE/DELETE)."""

    __tablename__ = "worklist_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str] = mapped_column(String(16), default="")
    to_state: Mapped[str] = mapped_column(String(16), default="")
    radiologist: Mapped[str] = mapped_column(String(64), default="")
    #: who did it: ``engine``, ``radiologist:<key>``, ``admin:<name>``
    actor: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[float] = mapped_column(Float, index=True)


class WebhookDelivery(Base):
    """Outbox of webhook posts (escalations, STAT assignments): written with the event,
    delivered until 2xx."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("worklist_events.id"))
    url: Mapped[str] = mapped_column(String(512))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, index=True)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()
            # Let SQLAlchemy's BEGIN below be the only transaction control.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE: take the write lock up front, so two writers never deadlock.
            # Read-only sessions (``engine.execution_options(read_only=True)``) begin a
            # plain snapshot instead: WAL lets them run beside the writer.
            if conn.get_execution_options().get("read_only"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    else:
        engine = create_engine(url, pool_pre_ping=True)
    from reading_queue.migrations import upgrade_database

    upgrade_database(engine)
    return engine


def hash_token(token: str) -> str:
    """Station tokens are stored as their SHA-256; the token itself is shown once."""
    return hashlib.sha256(token.encode()).hexdigest()


class AuditEvent(Base):
    """Append-only audit trail (database triggers refuse UPDATE/DELETE): every read of patient
    data and every action by a person, in the DICOM audit vocabulary (PS3.15 A.5, RFC 3881).

    ``detail`` is short free text for the reviewer and never holds patient names or IDs: the
    study is named by its UID only."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16), default="")
    #: EventID: "User Authentication", "DICOM Instances Accessed", "Query", ...
    action: Mapped[str] = mapped_column(String(64))
    #: EventActionCode: C(reate) R(ead) U(pdate) D(elete) E(xecute)
    action_code: Mapped[str] = mapped_column(String(1))
    #: short machine name: "auth.login", "study.read", "frame.read", ...
    event_type: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    address: Mapped[str] = mapped_column(String(64), default="")
    #: EventOutcomeIndicator: 0 success, 4 minor, 8 serious, 12 major failure
    outcome: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(String(255), default="")


# -- DICOM attribute index (QIDO-RS) ---------------------------------------------------------
#
# Derived from the instance headers inside the transaction that records each instance
# (reading_queue.intake.index), so it never disagrees with hub_instances; ``telerad hub
# reindex`` builds it from the archive for instances stored before it existed. Counts and
# modalities cover committed instances only: DICOMweb shows nothing of a study still arriving.
# Text is Unicode, decoded with each file's Specific Character Set. ``*_key`` columns hold the
# normalised (NFC, upper-case) form that case-insensitive matching compares.

#: PostgreSQL: LIKE 'prefix%' uses these indexes whatever the database's collation.
_PATTERN_OPS = "text_pattern_ops"


class DicomStudyIndex(Base):
    """Study-level attributes (from the study's first indexed instance; blanks filled by
    later ones). PHI: never logged."""

    __tablename__ = "dicom_studies"
    __table_args__ = (
        # the default order of a study search (StudyDate, StudyTime descending) and date ranges
        Index("ix_dicom_studies_date", "study_date", "study_time", "study_uid"),
        Index(
            "ix_dicom_studies_patient_name_key",
            "patient_name_key",
            postgresql_ops={"patient_name_key": _PATTERN_OPS},
        ),
        Index(
            "ix_dicom_studies_patient_id",
            "patient_id",
            postgresql_ops={"patient_id": _PATTERN_OPS},
        ),
        Index(
            "ix_dicom_studies_accession_number",
            "accession_number",
            postgresql_ops={"accession_number": _PATTERN_OPS},
        ),
    )
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_name: Mapped[str] = mapped_column(String(200), default="")
    patient_name_key: Mapped[str] = mapped_column(String(200), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(16), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(16), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str] = mapped_column(String(128), default="")
    study_description_key: Mapped[str] = mapped_column(String(128), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(200), default="")
    referring_physician_key: Mapped[str] = mapped_column(String(200), default="")
    study_id: Mapped[str] = mapped_column(String(64), default="")
    #: ModalitiesInStudy of the committed series, backslash-separated, sorted
    modalities: Mapped[str] = mapped_column(String(255), default="")
    #: committed series and instances (0: nothing committed yet, not shown)
    series_count: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class DicomSeriesIndex(Base):
    """Series-level attributes. Keyed by study and series: a series UID reused in another
    study (it happens) is two series, as hub_instances files them."""

    __tablename__ = "dicom_series"
    __table_args__ = (Index("ix_dicom_series_modality", "modality", "study_uid"),)
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(128), default="")
    series_description_key: Mapped[str] = mapped_column(String(128), default="")
    series_date: Mapped[str] = mapped_column(String(16), default="")
    series_time: Mapped[str] = mapped_column(String(16), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    #: committed instances
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class DicomInstanceIndex(Base):
    """Instance-level attributes, one row per ``hub_instances`` row (same key). A table of its
    own rather than columns on hub_instances: the ingest ledger stays as it is, the index can
    be dropped and rebuilt, and "not indexed yet" is simply a missing row (reindex)."""

    __tablename__ = "dicom_instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
