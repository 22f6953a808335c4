"""Re-queue studies whose message was lost, so a lost message cannot lose a study.

A message can die with a broker that restarts without persistence, or stay unacknowledged
for the broker's visibility timeout after its worker died.  The study then sits in `queued`
or `processing` with no one working on it.  The sweeper finds studies that have been there
longer than the configured timeout and hands them off again with a new generation (claim and
publish in one transaction, as the hand-off does); the new generation makes any late copy of
the old message stale, and results keyed by (instance, model) make a re-run write nothing twice.

It runs in the listener process, in the hand-off thread (``worker.handoff``), so every
deployment that receives studies also sweeps them; several listeners may sweep the same
database, the conditional UPDATE lets exactly one win each study.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.orm import Session, sessionmaker

from db.exports import lost_exports
from db.models import Study, StudyState, WorkerHeartbeat, utcnow
from db.session import session_scope
from db.transitions import move_state
from settings import Settings
from worker.publish import ExportPublisher, Handoff, Publisher

log = logging.getLogger("xray_triage.sweeper")

SWEEP_BATCH = 100


@dataclass(frozen=True)
class Stuck:
    study_id: int
    study_uid: str
    state: StudyState
    generation: int
    queue: str
    timed_out_at: datetime | None = None  # when it entered its state


def stuck_studies(session: Session, settings: Settings, now: datetime, limit: int = SWEEP_BATCH) -> list[Stuck]:
    """Studies queued or processing for longer than their timeout, or processing by a worker
    whose heartbeat has stopped, oldest first."""
    cfg = settings.worker
    queued_cutoff = now - timedelta(seconds=cfg.queued_timeout_s)
    processing_cutoff = now - timedelta(seconds=cfg.processing_timeout_s)
    dead_cutoff = now - timedelta(seconds=cfg.dead_worker_after_s)
    worker_dead = exists().where(
        WorkerHeartbeat.name == Study.processing_by, WorkerHeartbeat.last_seen_at <= dead_cutoff
    )
    rows = session.execute(
        select(
            Study.id, Study.study_uid, Study.state, Study.handoff_generation, Study.queue_name, Study.state_changed_at
        )
        .where(
            or_(
                (Study.state == StudyState.QUEUED) & (Study.state_changed_at <= queued_cutoff),
                (Study.state == StudyState.PROCESSING) & (Study.state_changed_at <= processing_cutoff),
                (Study.state == StudyState.PROCESSING) & (Study.state_changed_at <= dead_cutoff) & worker_dead,
            )
        )
        .order_by(Study.state_changed_at)
        .limit(limit)
    ).all()
    return [
        Stuck(int(r[0]), str(r[1]), StudyState(r[2]), int(r[3]), str(r[4] or settings.queues.routine), r[5])
        for r in rows
    ]


def expire_heartbeats(session: Session, settings: Settings, now: datetime) -> int:
    """Delete heartbeat rows of workers silent for `worker.heartbeat_expire_s`: a worker of an
    earlier run must not stay listed (in red) for ever."""
    cutoff = now - timedelta(seconds=settings.worker.heartbeat_expire_s)
    result = session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.last_seen_at <= cutoff))
    return int(getattr(result, "rowcount", 0) or 0)


def requeue(factory: sessionmaker[Session], stuck: Stuck, now: datetime, publish: Publisher, reason: str) -> int | None:
    """Claim and publish with generation + 1 in one transaction; the new generation, or None if it moved on."""
    with session_scope(factory) as session:
        won = move_state(
            session,
            stuck.study_id,
            stuck.state,
            StudyState.QUEUED,
            now,
            reason=reason,
            where=[Study.handoff_generation == stuck.generation],
            values={"handoff_generation": stuck.generation + 1, "queued_at": now},
        )
        if not won:
            return None
        publish(Handoff(stuck.study_uid, stuck.generation + 1, stuck.queue))
        return stuck.generation + 1


def _reason(stuck: Stuck, settings: Settings, now: datetime) -> str:
    cfg = settings.worker
    if stuck.state is StudyState.QUEUED:
        return f"re-queued by the sweeper: queued for more than {cfg.queued_timeout_s:g} s"
    if stuck.timed_out_at is not None and stuck.timed_out_at <= now - timedelta(seconds=cfg.processing_timeout_s):
        return f"re-queued by the sweeper: processing for more than {cfg.processing_timeout_s:g} s"
    return f"re-queued by the sweeper: its worker's heartbeat stopped more than {cfg.dead_worker_after_s:g} s ago"


def republish_exports(factory: sessionmaker[Session], publish: ExportPublisher, now: datetime) -> int:
    """Publish again the pending exports whose message was lost; stops at the first publish failure."""
    with factory() as session:
        lost = lost_exports(session, now)
    for n, export_id in enumerate(lost):
        try:
            publish(export_id)
        except Exception as exc:  # noqa: BLE001 - broker down: next sweep
            log.warning("re-publishing export %d failed, will retry: %s", export_id, type(exc).__name__)
            return n
    if lost:
        log.warning("re-published %d export(s) whose message was lost", len(lost))
    return len(lost)


def sweep_once(
    factory: sessionmaker[Session],
    publish: Publisher,
    settings: Settings,
    now: datetime | None = None,
    publish_export: ExportPublisher | None = None,
) -> int:
    """Re-queue every stuck study (and re-publish lost exports); stops at the first publish failure
    (the broker is down). Returns the count of studies re-queued."""
    now = now or utcnow()
    if publish_export is not None:
        republish_exports(factory, publish_export, now)
    with session_scope(factory) as session:
        expired = expire_heartbeats(session, settings, now)
    if expired:
        log.info("forgot %d worker heartbeat(s) silent for more than %g s", expired, settings.worker.heartbeat_expire_s)
    with factory() as session:
        candidates = stuck_studies(session, settings, now)
    done = 0
    for stuck in candidates:
        reason = _reason(stuck, settings, now)
        try:
            generation = requeue(factory, stuck, now, publish, reason)
        except Exception as exc:  # noqa: BLE001 - broker or database down: roll back, retry next sweep
            log.warning("re-queue of study %s failed, will retry: %s: %s", stuck.study_uid, type(exc).__name__, exc)
            break
        if generation is not None:
            log.warning(
                "study %s was %s too long: re-queued (generation %d)", stuck.study_uid, stuck.state.value, generation
            )
            done += 1
    return done
