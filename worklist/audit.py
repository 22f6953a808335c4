"""The audit trail: who viewed or changed which study, and when (never patient data)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AuditEvent


def record(
    session: Session,
    username: str | None,
    action: str,
    now: datetime,
    study_uid: str | None = None,
    detail: str | None = None,
) -> None:
    session.add(AuditEvent(username=username, action=action, study_uid=study_uid, detail=detail, at=now))


def events_for(session: Session, study_uid: str, limit: int = 50) -> list[AuditEvent]:
    stmt = select(AuditEvent).where(AuditEvent.study_uid == study_uid).order_by(AuditEvent.id.desc()).limit(limit)
    return list(session.scalars(stmt))
