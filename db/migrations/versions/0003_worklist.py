"""worklist: read state and top finding per study, users, audit trail, worker heartbeats

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER TABLE ... ADD several columns otherwise.
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("top_finding", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("top_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("flagged_findings", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("read_state", sa.String(length=16), nullable=False, server_default="unread"))
        batch.add_column(sa.Column("read_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("read_state_at", UTCDateTime(timezone=True), nullable=True))
        batch.drop_index("ix_study_priority_received")
        batch.create_index("ix_study_priority_received", ["priority", "received_at", "id"], unique=False)
        batch.create_index("ix_study_read_state", ["read_state", "received_at"], unique=False)
        batch.create_index("ix_study_calling_ae", ["calling_ae", "received_at"], unique=False)
        batch.create_index("ix_study_study_date", ["study_date"], unique=False)
    op.create_table(
        "app_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_event_at", "audit_event", ["at"], unique=False)
    op.create_index("ix_audit_event_username", "audit_event", ["username"], unique=False)
    op.create_index("ix_audit_event_study_uid", "audit_event", ["study_uid"], unique=False)
    op.create_table(
        "worker_heartbeat",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("hostname", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.Text(), nullable=False),
        sa.Column("model_ref", sa.String(length=128), nullable=True),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("tasks_done", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeat")
    op.drop_index("ix_audit_event_study_uid", table_name="audit_event")
    op.drop_index("ix_audit_event_username", table_name="audit_event")
    op.drop_index("ix_audit_event_at", table_name="audit_event")
    op.drop_table("audit_event")
    op.drop_table("app_user")
    with op.batch_alter_table("study") as batch:
        batch.drop_index("ix_study_study_date")
        batch.drop_index("ix_study_calling_ae")
        batch.drop_index("ix_study_read_state")
        batch.drop_index("ix_study_priority_received")
        batch.create_index("ix_study_priority_received", ["priority", "received_at"], unique=False)
        for col in ("read_state_at", "read_by", "read_state", "flagged_findings", "top_score", "top_finding"):
            batch.drop_column(col)
