"""incomplete studies, DICOM sources

Revision ID: 0003
Revises: 0002

A gateway that could not forward some instances for good says so at commit: the hub keeps
how many and why (``hub_studies``), and the worklist shows the study as incomplete
(``studies.missing_instances``) instead of committing it as if it were whole. The hub's own
DICOM port accepts only registered sources (``dicom_sources``), each bound to a station.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_sources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("aet", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), server_default="", nullable=False),
        sa.Column("station", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("aet", "host"),
    )
    with op.batch_alter_table("hub_studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("missing_instances", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("missing_reason", sa.String(length=500), server_default="", nullable=False)
        )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("missing_instances", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    op.drop_table("dicom_sources")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("missing_instances")
    with op.batch_alter_table("hub_studies", schema=None) as batch_op:
        batch_op.drop_column("missing_reason")
        batch_op.drop_column("missing_instances")
