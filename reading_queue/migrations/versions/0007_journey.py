"""station receipt time, station index

Revision ID: 0007
Revises: 0006

A study's journey starts when the station received its first instance: the gateway tells
the hub how long ago that was, and the hub keeps the time in its own clock
(``hub_studies.station_received_at``). A clinic's searches filter on its station
(``ix_hub_studies_station``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hub_studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("station_received_at", sa.Float(), nullable=True))
        batch_op.create_index("ix_hub_studies_station", ["station"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("hub_studies", schema=None) as batch_op:
        batch_op.drop_index("ix_hub_studies_station")
        batch_op.drop_column("station_received_at")
