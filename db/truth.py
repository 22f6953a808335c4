"""Ground truth as the study page, the API and the CSV import record it: one place that writes it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import GroundTruth, TruthLabel

SOURCES = ("radiologist", "import")


def truth_of(session: Session, study_id: int) -> dict[str, GroundTruth]:
    rows = session.scalars(select(GroundTruth).where(GroundTruth.study_id == study_id))
    return {r.finding: r for r in rows}


def set_truth(
    session: Session,
    study_id: int,
    finding: str,
    label: TruthLabel | None,
    source: str,
    username: str | None,
    now: datetime,
) -> tuple[str | None, str | None]:
    """Record (or, with None, clear) one finding's label; returns (before, after) for the audit trail.

    The caller has checked the finding's name against the model's findings (``models.findings``)."""
    if source not in SOURCES:
        raise ValueError(f"unknown ground-truth source {source!r}")
    row = session.scalar(select(GroundTruth).where(GroundTruth.study_id == study_id, GroundTruth.finding == finding))
    before = str(row.label) if row is not None else None
    if label is None:
        if row is not None:
            session.delete(row)
        return before, None
    if row is None:
        row = GroundTruth(study_id=study_id, finding=finding)
        session.add(row)
    row.label, row.source, row.recorded_by, row.recorded_at = label, source, username, now
    session.flush()
    return before, str(label)
