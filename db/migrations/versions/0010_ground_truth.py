"""radiologists' ground truth per study and finding

What a radiologist recorded after reading (or a retrospective CSV import): the reference the
site measures the model against.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 00:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ground_truth",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id", ondelete="CASCADE"), nullable=False),
        sa.Column("finding", sa.String(32), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("recorded_by", sa.String(64), nullable=True),
        sa.Column("recorded_at", UTCDateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_id", "finding", name="uq_ground_truth_study_finding"),
    )
    op.create_index("ix_ground_truth_study_id", "ground_truth", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_ground_truth_study_id", table_name="ground_truth")
    op.drop_table("ground_truth")
