"""per-instance results and study-level triage columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instance_result",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_ref", sa.String(length=128), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("flags", sa.JSON(), nullable=True),
        sa.Column("thresholds", sa.JSON(), nullable=True),
        sa.Column("heatmaps", sa.JSON(), nullable=True),
        sa.Column("pipeline_version", sa.String(length=32), nullable=False),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("queued_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instance.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("instance_id", "model_ref", name="uq_result_instance_model"),
    )
    op.create_index("ix_instance_result_study_id", "instance_result", ["study_id"], unique=False)
    # batch mode: SQLite cannot ALTER TABLE ... ADD several columns otherwise portable here.
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("ai_priority", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("ai_state", sa.Text(), nullable=True))
        batch.add_column(sa.Column("model_ref", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_column("model_ref")
        batch.drop_column("ai_state")
        batch.drop_column("ai_priority")
    op.drop_index("ix_instance_result_study_id", table_name="instance_result")
    op.drop_table("instance_result")
