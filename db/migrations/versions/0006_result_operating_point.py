"""the operating point (adult or paediatric) each instance result was judged at

Thresholds and steering differ per population, so a redelivered study must judge an instance
stored earlier at the point it was flagged at; results stored before this column are adult.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance_result") as batch:
        batch.add_column(sa.Column("operating_point", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance_result") as batch:
        batch.drop_column("operating_point")
