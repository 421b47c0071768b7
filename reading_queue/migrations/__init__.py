"""Alembic migrations of the hub database, applied at start (``upgrade_database``).

Programmatic configuration only (no alembic.ini): the hub passes its engine's connection.
A database created before migrations existed (tables present, no ``alembic_version``) is
stamped at the baseline revision, then upgraded.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

BASELINE = "0001"


def _config(connection: object) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade_database(engine: Engine) -> None:
    with engine.begin() as connection:
        cfg = _config(connection)
        tables = set(inspect(connection).get_table_names())
        if "stations" in tables and "alembic_version" not in tables:
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")
