"""What `xray-triage status` and the admin page report: studies per state, queue depths."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from broker import make_celery, queue_depths
from db.models import Study, StudyState
from db.session import make_engine, make_sessionmaker
from settings import Settings


def study_counts(settings: Settings) -> dict[str, int]:
    engine = make_engine(settings.database.url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
    finally:
        engine.dispose()
    counts = {s.value: 0 for s in StudyState}
    counts.update({str(state): int(n) for state, n in rows})
    return counts


def collect_status(settings: Settings) -> dict[str, Any]:
    app = make_celery(settings)
    names = [settings.queues.urgent, settings.queues.routine]
    try:
        depths = queue_depths(app, names)
    except Exception:  # noqa: BLE001 - broker down: report unknown depth, not a crash
        depths = dict.fromkeys(names)
    return {"studies": study_counts(settings), "queues": depths}
