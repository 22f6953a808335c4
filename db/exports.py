"""Export rows as the sweeper and the web app touch them (the export task itself is in ``worker.export``)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import Export, ExportState, utcnow

# Pending exports this long past due lost their message (the broker was down when it was
# published, or a worker died holding it): the sweeper publishes them again.
LOST_AFTER_S = 60.0


def lost_exports(session: Session, now: datetime, limit: int = 100) -> list[int]:
    return list(
        session.scalars(
            select(Export.id)
            .where(Export.state == ExportState.PENDING, Export.next_attempt_at < now - timedelta(seconds=LOST_AFTER_S))
            .order_by(Export.next_attempt_at)
            .limit(limit)
        )
    )


def retry_now(session: Session, export_id: int) -> bool:
    """An admin's "retry now": a failed or pending export starts over with a fresh attempt budget."""
    now = utcnow()
    result = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.state.in_([ExportState.FAILED, ExportState.PENDING]))
        .values(state=ExportState.PENDING, attempts=0, next_attempt_at=now, updated_at=now)
    )
    return bool(getattr(result, "rowcount", 0))


def export_counts(session: Session) -> dict[str, int]:
    """Exports per state (``xray-triage status``, the admin page)."""
    return {
        str(state): int(n) for state, n in session.execute(select(Export.state, func.count()).group_by(Export.state))
    }
