"""Alembic environment: runs on the connection the hub hands over (see ``__init__``)."""

from __future__ import annotations

from alembic import context

from reading_queue.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # ALTER on SQLite needs batch mode
)
with context.begin_transaction():
    context.run_migrations()
