"""index of reported studies by time

Revision ID: 0008
Revises: 0007

Every worklist round sums each reader's recent RVU (``reported_at`` within the fairness
window); on a hub with a year of history that was a scan of every study each round.
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_studies_reported_at", "studies", ["reported_at", "assignee", "rvu"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_studies_reported_at", table_name="studies")
