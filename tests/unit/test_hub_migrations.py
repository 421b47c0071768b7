"""Hub schema = Alembic migrations, applied at start; models and migrations never drift."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from reading_queue.intake.service import open_ingest
from reading_queue.migrations import _config
from reading_queue.models import Base, make_engine
from reading_queue.settings import HubSettings

HEAD = ScriptDirectory.from_config(_config(None)).get_current_head()


def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.sqlite3'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models changed without a migration: {diff}"
        assert "alembic_version" in inspect(conn).get_table_names()
    make_engine(f"sqlite:///{tmp_path / 'hub.sqlite3'}")  # idempotent at every start


def test_database_from_before_migrations_is_stamped_and_kept(tmp_path: Path) -> None:
    db = tmp_path / "hub.sqlite3"
    legacy = create_engine(f"sqlite:///{db}")
    with legacy.begin() as conn:  # the schema hubs had before migrations: the baseline's
        command.upgrade(_config(conn), "0001")
        conn.exec_driver_sql("DROP TABLE alembic_version")
    legacy.dispose()
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO stations (name, token_sha256, created_at, active) "
            "VALUES ('tram-old', 'x', 0, 1)"
        )
    ingest = open_ingest(HubSettings(data_dir=tmp_path))
    assert [s.name for s in ingest.list_stations()] == ["tram-old"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (HEAD,)
