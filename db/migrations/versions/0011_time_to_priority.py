"""seconds from the end of the push to the committed priority, per study

Stored when the worker commits the result, so /metrics can report the time-to-notification
histogram with one portable query on SQLite and PostgreSQL alike.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 00:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("time_to_priority_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_column("time_to_priority_s")
