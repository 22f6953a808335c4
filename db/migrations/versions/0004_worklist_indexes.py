"""worklist indexes: every segment of a filtered page is a range of an index (bench/worklist)

``ix_study_received_at`` goes: nothing queries ``received_at`` alone, and because studies
are stored in arrival order its physical correlation is ~1, so the planner preferred walking
it in time order and filtering on priority (and on every filter) over the range scans of
``ix_study_priority_received`` - thousands of rows read and thrown away per worklist page,
growing with the table.  The read-state filter (the "unread" view) gets an index with the
same (priority, received_at, id) tail, so each segment is a range of it; the finding filter
gets a partial index over the flagged studies only (``flagged_findings LIKE ...`` implies
``IS NOT NULL``, so PostgreSQL uses it for any finding, generic plans included).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FLAGGED = "flagged_findings IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_index("ix_study_received_at")
        batch.drop_index("ix_study_read_state")
        batch.create_index(
            "ix_study_read_state_priority", ["read_state", "priority", "received_at", "id"], unique=False
        )
        batch.create_index(
            "ix_study_flagged_priority",
            ["priority", "received_at", "id"],
            unique=False,
            postgresql_where=sa.text(FLAGGED),
            sqlite_where=sa.text(FLAGGED),
        )


def downgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_index("ix_study_flagged_priority")
        batch.drop_index("ix_study_read_state_priority")
        batch.create_index("ix_study_read_state", ["read_state", "received_at"], unique=False)
        batch.create_index("ix_study_received_at", ["received_at"], unique=False)
