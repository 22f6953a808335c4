"""when the association that sent a study's instances was released

A modality or PACS usually sends a whole study in one association and releases it: that is
the moment the study is complete, and the hand-off can queue it after a short grace period
instead of waiting out the stability window.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 19:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("released_at", UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_column("released_at")
