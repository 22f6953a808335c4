"""Audited site overrides as stored: the current values, a change, a rollback."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import SiteOverride

SILENT_MODE = "silent_mode"
THRESHOLD_PREFIX = "threshold:"
# The primary and the shadow model's folders, swapped by an admin's promotion of the shadow.
MODEL_PATH = "model:path"
SHADOW_PATH = "model:shadow_path"


def current_overrides(session: Session) -> dict[str, Any]:
    """Newest value per key (a key whose newest value is null is not overridden)."""
    out: dict[str, Any] = {}
    for row in session.scalars(select(SiteOverride).order_by(SiteOverride.id)):
        out[row.key] = row.value
    return {k: v for k, v in out.items() if v is not None}


def history(session: Session, limit: int = 50) -> list[SiteOverride]:
    return list(session.scalars(select(SiteOverride).order_by(SiteOverride.id.desc()).limit(limit)))


def change(
    session: Session,
    key: str,
    value: Any,
    previous: Any,
    by: str,
    evidence: str,
    now: datetime,
    rolls_back: int | None = None,
) -> SiteOverride:
    """Append one change; the caller has validated key and value and knows the effective previous value."""
    row = SiteOverride(
        key=key, value=value, previous=previous, set_by=by, set_at=now, evidence=evidence, rolls_back=rolls_back
    )
    session.add(row)
    session.flush()
    return row


def newest_for(session: Session, key: str) -> SiteOverride | None:
    return session.scalar(select(SiteOverride).where(SiteOverride.key == key).order_by(SiteOverride.id.desc()).limit(1))
