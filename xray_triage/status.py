"""What `xray-triage status` and the admin page report: studies per state, exports per state, queue depths."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from broker import make_celery, queue_depths
from db.exports import export_counts
from db.models import ExportState, Study, StudyState
from db.session import make_engine, make_sessionmaker
from settings import Settings


def study_counts(settings: Settings) -> dict[str, int]:
    return _counts(settings)[0]


def _counts(settings: Settings) -> tuple[dict[str, int], dict[str, int]]:
    engine = make_engine(settings.database.url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
            exports = export_counts(session)
    finally:
        engine.dispose()
    counts = {s.value: 0 for s in StudyState}
    counts.update({str(state): int(n) for state, n in rows})
    return counts, {s.value: 0 for s in ExportState} | exports


def collect_status(settings: Settings) -> dict[str, Any]:
    app = make_celery(settings)
    names = [settings.queues.urgent, settings.queues.routine, settings.export.queue]
    try:
        depths = queue_depths(app, names)
    except Exception:  # noqa: BLE001 - broker down: report unknown depth, not a crash
        depths = dict.fromkeys(names)
    studies, exports = _counts(settings)
    return {"studies": studies, "exports": exports, "queues": depths}
