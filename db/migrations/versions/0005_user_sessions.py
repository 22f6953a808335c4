"""server-side worklist sessions (logout and password changes end them) and login throttling

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_session",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["app_user.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    op.create_index("ix_user_session_user_id", "user_session", ["user_id"], unique=False)
    # Failed logins are counted per attempted user name in a recent window.
    op.create_index("ix_audit_event_action_user_at", "audit_event", ["action", "username", "at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_event_action_user_at", table_name="audit_event")
    op.drop_index("ix_user_session_user_id", table_name="user_session")
    op.drop_table("user_session")
