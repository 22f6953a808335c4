"""results on their way to PACS and RIS destinations

One row per (study, destination, hand-off generation): written with the result, sent by its
own task, with attempts, the last error and per-object status.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id", ondelete="CASCADE"), nullable=False),
        sa.Column("destination", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("model_ref", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("objects", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("sent_at", UTCDateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("study_id", "destination", "generation", name="uq_export_study_destination_generation"),
    )
    op.create_index("ix_export_study_id", "export", ["study_id"])
    op.create_index("ix_export_state_next", "export", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_export_state_next", table_name="export")
    op.drop_index("ix_export_study_id", table_name="export")
    op.drop_table("export")
