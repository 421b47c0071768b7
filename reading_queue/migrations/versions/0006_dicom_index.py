"""DICOM attribute index for QIDO-RS

Revision ID: 0006
Revises: 0005

Study, series and instance attributes taken from each instance's header when the hub stores
it (reading_queue.intake.index). Hubs that stored studies before this revision get empty
tables here: ``telerad hub reindex`` fills them from the archive (a migration cannot read
the archive, which may be a remote Orthanc).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: PostgreSQL: LIKE 'prefix%' uses the index whatever the database's collation.
PATTERN_OPS = "text_pattern_ops"


def upgrade() -> None:
    op.create_table(
        "dicom_studies",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_name", sa.String(length=200), nullable=False),
        sa.Column("patient_name_key", sa.String(length=200), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("patient_birth_date", sa.String(length=16), nullable=False),
        sa.Column("patient_sex", sa.String(length=16), nullable=False),
        sa.Column("study_date", sa.String(length=16), nullable=False),
        sa.Column("study_time", sa.String(length=16), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=False),
        sa.Column("study_description", sa.String(length=128), nullable=False),
        sa.Column("study_description_key", sa.String(length=128), nullable=False),
        sa.Column("referring_physician_name", sa.String(length=200), nullable=False),
        sa.Column("referring_physician_key", sa.String(length=200), nullable=False),
        sa.Column("study_id", sa.String(length=64), nullable=False),
        sa.Column("modalities", sa.String(length=255), nullable=False),
        sa.Column("series_count", sa.Integer(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid"),
    )
    with op.batch_alter_table("dicom_studies", schema=None) as batch_op:
        batch_op.create_index(
            "ix_dicom_studies_date", ["study_date", "study_time", "study_uid"], unique=False
        )
        for column in ("patient_name_key", "patient_id", "accession_number"):
            batch_op.create_index(
                f"ix_dicom_studies_{column}",
                [column],
                unique=False,
                postgresql_ops={column: PATTERN_OPS},
            )

    op.create_table(
        "dicom_series",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=128), nullable=False),
        sa.Column("series_description_key", sa.String(length=128), nullable=False),
        sa.Column("series_date", sa.String(length=16), nullable=False),
        sa.Column("series_time", sa.String(length=16), nullable=False),
        sa.Column("body_part_examined", sa.String(length=64), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid", "series_uid"),
    )
    with op.batch_alter_table("dicom_series", schema=None) as batch_op:
        batch_op.create_index("ix_dicom_series_modality", ["modality", "study_uid"], unique=False)

    op.create_table(
        "dicom_instances",
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid"),
    )


def downgrade() -> None:
    op.drop_table("dicom_instances")
    with op.batch_alter_table("dicom_series", schema=None) as batch_op:
        batch_op.drop_index("ix_dicom_series_modality")
    op.drop_table("dicom_series")
    with op.batch_alter_table("dicom_studies", schema=None) as batch_op:
        for column in ("accession_number", "patient_id", "patient_name_key"):
            batch_op.drop_index(f"ix_dicom_studies_{column}")
        batch_op.drop_index("ix_dicom_studies_date")
    op.drop_table("dicom_studies")
