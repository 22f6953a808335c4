"""which worker process is scoring a study, so the sweeper can tell a dead worker's study

A worker killed outright (kill -9, a host lost) leaves its study `processing`; knowing the
process (its heartbeat row's name) lets the sweeper re-queue it once that heartbeat stops,
within about a minute, instead of after the processing timeout (30 min).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("processing_by", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_column("processing_by")
