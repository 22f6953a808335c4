"""audited site overrides: thresholds and silent mode changed in the web app

Append-only: who, when, old and new value and the evidence of every change, so it can be
shown and rolled back.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 01:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_override",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=True),
        sa.Column("previous", sa.JSON(), nullable=True),
        sa.Column("set_by", sa.String(64), nullable=False),
        sa.Column("set_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("rolls_back", sa.Integer(), nullable=True),
    )
    op.create_index("ix_site_override_key", "site_override", ["key"])


def downgrade() -> None:
    op.drop_index("ix_site_override_key", table_name="site_override")
    op.drop_table("site_override")
