"""Hub tables (SQLAlchemy 2.0). The reading-queue issue extends these with the worklist."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
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
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    else:
        engine = create_engine(url, pool_pre_ping=True)
    from reading_queue.migrations import upgrade_database

    upgrade_database(engine)
    return engine
