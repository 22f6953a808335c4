"""the flagged findings that steer the study's priority

``flagged_findings`` holds every finding at or above its threshold, including informational
ones whose operating point is too weak to steer (a mass threshold that flags most normal
films).  The worklist row names only the steering ones, so they are stored beside it.
Studies scored before this revision keep NULL: the row then names only the top finding,
which always steers.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 03:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("steering_findings", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_column("steering_findings")
