"""The `xray_triage.process_study` task: claim a queued study, score it, store it, exactly once.

A message carries (Study UID, hand-off generation).  The generation lets the worker tell a
current message from a stale one: the study may have received new instances (and been
re-queued with a higher generation) since this message was published, or a message may have
been delivered twice.  Stale messages are acknowledged and ignored.

Each pool process also keeps a heartbeat row (worker/heartbeat.py), started and stopped by
Celery's process signals, so the admin page can tell a live worker from a dead one.

Exactly once: messages are acknowledged late and rejected (re-queued) when the worker
process dies; a redelivery resumes a study still `processing` under its generation, and the
results are keyed by (instance, model version), so it never writes twice.  Database and
broker errors are retried with capped exponential backoff; a study whose retries run out
stays `processing` until the sweeper (worker/sweeper.py) re-queues it.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

import sqlalchemy.exc
from celery import Celery, Task
from celery.exceptions import Retry
from celery.signals import worker_process_init, worker_process_shutdown
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from broker import PROCESS_STUDY_TASK
from db.models import Study, StudyState, utcnow
from db.session import make_engine, make_sessionmaker, session_scope
from db.transitions import move_state
from models.registry import TriageModel
from settings import Settings
from triage.policy import AI_UNAVAILABLE, Decision, Level
from triage.service import Scorer
from worker.heartbeat import HeartbeatThread, TaskCounter, WorkerIdentity
from worker.scoring import decide_study, final_state, pending_instances, run_pipeline, store_results

log = logging.getLogger("xray_triage.tasks")

# A message may overtake the commit of its own hand-off; how long to wait for that commit.
NOT_YET_RETRIES = 30
NOT_YET_COUNTDOWN_S = 1.0


class Claim(enum.Enum):
    STARTED = "started"
    STALE = "stale"
    NOT_YET = "not-yet"


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    study_id: int | None = None


def begin_processing(
    session: Session, study_uid: str, generation: int, now: datetime, worker: str | None = None
) -> ClaimResult:
    """queued -> processing for this generation, or say why not; `worker` (this process's
    heartbeat name) is recorded so that the sweeper can tell when the worker has died.

    A study already `processing` under the same generation is resumed: that is the message
    redelivered after a worker died (acks_late), not a second copy to ignore.
    """
    row = session.execute(
        select(Study.id, Study.state, Study.handoff_generation).where(Study.study_uid == study_uid)
    ).first()
    if row is None:
        return ClaimResult(Claim.STALE)
    study_id, state, db_generation = int(row[0]), StudyState(row[1]), int(row[2])
    if generation > db_generation:
        return ClaimResult(Claim.NOT_YET, study_id)
    if generation < db_generation:
        return ClaimResult(Claim.STALE, study_id)
    if state is StudyState.PROCESSING:
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.handoff_generation == generation)
            .values(processing_by=worker)
        )
        return ClaimResult(Claim.STARTED, study_id)
    won = move_state(
        session,
        study_id,
        StudyState.QUEUED,
        StudyState.PROCESSING,
        now,
        where=[Study.handoff_generation == generation],
        values={"processing_at": now, "processing_by": worker},
    )
    return ClaimResult(Claim.STARTED if won else Claim.STALE, study_id)


def finish_study(
    session: Session,
    study_id: int,
    generation: int,
    state: StudyState,
    reason: str | None,
    now: datetime,
    values: dict[str, Any] | None = None,
) -> bool:
    """processing -> a final state, unless the study was re-opened meanwhile (then False)."""
    return move_state(
        session,
        study_id,
        StudyState.PROCESSING,
        state,
        now,
        reason=reason,
        where=[Study.handoff_generation == generation],
        values={"finished_at": now, **(values or {})},
    )


@cache
def _factory(url: str) -> sessionmaker[Session]:
    # Created lazily inside each worker process (after the prefork fork), one per process.
    return make_sessionmaker(make_engine(url, hide_parameters=True))


# Errors that may go away by waiting: the database or the broker is unreachable or busy.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    BrokerError,
    ConnectionError,
    TimeoutError,
)


def backoff_s(retries: int, base: float, cap: float) -> float:
    """Exponential backoff with a cap: base, 2*base, 4*base, ... <= cap."""
    return float(min(cap, base * 2 ** min(retries, 30)))


def scoring_model(settings: Settings) -> TriageModel:
    """The configured model, loaded once per process (models.registry caches it)."""
    from models.registry import get_model

    return get_model(settings=settings)


@dataclass(frozen=True)
class Outcome:
    state: StudyState
    decision: Decision
    applied: bool  # False when the study was re-opened meanwhile (results kept, state not set)


def score_claimed(
    factory: sessionmaker[Session], settings: Settings, model: TriageModel, study_id: int, generation: int
) -> Outcome:
    """Run the pipeline for a study this process holds in `processing`; store everything at once."""
    from dicom_io.pixels import PIPELINE_VERSION

    started = utcnow()
    with factory() as session:
        work = pending_instances(session, study_id, model.ref)
    scorer = Scorer(model, settings)  # thresholds and steering per population, once per study
    rows, _ = run_pipeline(scorer, work, settings)
    decision = decide_study(work, rows, scorer)
    state = final_state(decision)
    with session_scope(factory) as session:
        now = utcnow()
        store_results(session, work, rows, model.ref, PIPELINE_VERSION, started, now)
        applied = finish_study(
            session,
            study_id,
            generation,
            state,
            decision.reason,
            now,
            values={
                "priority": decision.priority,
                "ai_priority": decision.ai_priority,
                "priority_reason": decision.priority_reason,
                "ai_state": decision.ai_state,
                "model_ref": model.ref,
                "top_finding": decision.top_finding,
                "top_score": decision.top_score,
                "flagged_findings": decision.flagged_findings,
            },
        )
    return Outcome(state, decision, applied)


def fail_claimed(factory: sessionmaker[Session], study_id: int, generation: int, reason: str) -> bool:
    """processing -> failed(reason), routine and marked "AI unavailable – read as usual"."""
    with session_scope(factory) as session:
        return finish_study(
            session,
            study_id,
            generation,
            StudyState.FAILED,
            reason,
            utcnow(),
            values={
                "priority": Level.ROUTINE,
                "ai_priority": Level.ROUTINE,
                "priority_reason": f"{AI_UNAVAILABLE} ({reason})",
                "ai_state": AI_UNAVAILABLE,
                # A re-queued study may carry an earlier generation's opinion: it no longer holds.
                "top_finding": None,
                "top_score": None,
                "flagged_findings": None,
            },
        )


@dataclass
class PoolProcess:
    """What one pool process keeps between tasks; each prefork child gets its own copy at fork."""

    counter: TaskCounter = field(default_factory=TaskCounter)
    heartbeat: HeartbeatThread | None = None


def worker_name() -> str:
    """This pool process's heartbeat name, ``host:pid``: also what a claimed study records."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pool_identity(app: Celery, model_ref: str | None) -> WorkerIdentity:
    """This pool process as its heartbeat row names it: ``host:pid``, the queues it consumes."""
    queues = ",".join(app.amqp.queues.consume_from)  # narrowed to the worker's -Q before the fork
    return WorkerIdentity(worker_name(), socket.gethostname(), os.getpid(), queues, model_ref)


def _load_model(settings: Settings) -> str | None:
    """The model's ref, or None when it cannot be loaded (the task then reports it per study)."""
    try:
        return str(scoring_model(settings).ref)
    except Exception:  # the worker must start; each study will fail with the reason
        log.exception("could not load the scoring model")
        return None


def _start_heartbeat(
    app: Celery, settings: Settings, model_ref: str | None, counter: TaskCounter
) -> HeartbeatThread | None:
    """The pool process's heartbeat thread, or None: without a heartbeat the worker still scores."""
    interval_s = settings.worker.heartbeat_interval_s
    try:
        thread = HeartbeatThread(_factory(settings.database.url), pool_identity(app, model_ref), interval_s, counter)
        thread.start()
    except Exception:
        log.exception("could not start the worker heartbeat")
        return None
    return thread


def register_tasks(app: Celery, settings: Settings) -> Task:
    """Register process_study on `app`, the per-process model load and heartbeat; returns the task object."""
    url = settings.database.url
    cfg = settings.worker
    process = PoolProcess()

    @worker_process_init.connect(weak=False)
    def _init_pool_process(**_kwargs: Any) -> None:
        # Each prefork child loads the model once, before its first task, not per task; its
        # heartbeat starts after, so the row names the model it really serves.
        process.heartbeat = _start_heartbeat(app, settings, _load_model(settings), process.counter)

    @worker_process_shutdown.connect(weak=False)
    def _stop_heartbeat(**_kwargs: Any) -> None:
        if process.heartbeat is not None:
            process.heartbeat.stop()

    @app.task(name=PROCESS_STUDY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def process_study(self: Task, study_uid: str, generation: int) -> str:
        claimed: ClaimResult | None = None
        factory = _factory(url)
        try:
            with session_scope(factory) as session:
                claimed = begin_processing(session, study_uid, int(generation), utcnow(), worker_name())
            if claimed.claim is Claim.NOT_YET:
                raise self.retry(countdown=NOT_YET_COUNTDOWN_S, max_retries=NOT_YET_RETRIES)
            if claimed.claim is Claim.STALE or claimed.study_id is None:
                log.info("study %s generation %s: stale message ignored", study_uid, generation)
                return Claim.STALE.value
            outcome = score_claimed(factory, settings, scoring_model(settings), claimed.study_id, int(generation))
        except TRANSIENT_ERRORS as exc:
            countdown = backoff_s(self.request.retries, cfg.retry_base_s, cfg.retry_cap_s)
            log.warning(
                "study %s generation %s: %s, retry %d in %.1f s",
                study_uid, generation, type(exc).__name__, self.request.retries + 1, countdown,
            )  # fmt: skip
            raise self.retry(exc=exc, countdown=countdown, max_retries=cfg.max_retries) from None
        except Retry:
            raise
        except Exception as exc:
            # No model, or a bug: retrying cannot help, and the study must not sit in `processing`
            # until the sweeper re-queues it forever.  It goes on the worklist, read as usual.
            if claimed is None or claimed.study_id is None:
                raise
            log.error("study %s generation %s: scoring failed: %s", study_uid, generation, type(exc).__name__)
            fail_claimed(factory, claimed.study_id, int(generation), f"AI error: {type(exc).__name__}: {exc}")
            process.counter.add()
            return StudyState.FAILED.value
        log.info(
            "study %s generation %s: %s (%s)%s",
            study_uid, generation, outcome.state.value, outcome.decision.priority_reason,
            "" if outcome.applied else " (superseded)",
        )  # fmt: skip
        process.counter.add()  # the heartbeat thread writes it; no DB write on this path
        return outcome.state.value

    return process_study
