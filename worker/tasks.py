"""The `xray_triage.process_study` task: claim a queued study, score it, store it, exactly once.

A message carries (Study UID, hand-off generation).  The generation lets the worker tell a
current message from a stale one: the study may have received new instances (and been
re-queued with a higher generation) since this message was published, or a message may have
been delivered twice.  Stale messages are acknowledged and ignored.

Each pool process also keeps a heartbeat row (worker/heartbeat.py), started and stopped by
Celery's process signals, so the admin page can tell a live worker from a dead one.

Batching across studies: a task that claims its study also claims up to
``worker.batch_studies - 1`` other studies already waiting in the queues this worker serves
(urgent first, oldest first), straight from the database, and scores all of them in shared
forward passes.  Nothing waits for company: only studies already queued are taken.  Their
own messages arrive later and are acknowledged without work (the study is finished, or being
scored by a live worker).

Exactly once: messages are acknowledged late and rejected (re-queued) when the worker
process dies; a redelivery resumes a study still `processing` under its generation when the
process that claimed it is gone (its heartbeat stopped) or is this one, and the results are
keyed by (instance, model version), so it never writes twice.  Database and
broker errors are retried with capped exponential backoff; a study whose retries run out
stays `processing` until the sweeper (worker/sweeper.py) re-queues it.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import sqlalchemy.exc
from celery import Celery, Task
from celery.exceptions import Retry
from celery.signals import worker_process_init, worker_process_shutdown
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import case, select, update
from sqlalchemy.orm import Session, sessionmaker

from broker import EXPORT_TASK, PROCESS_STUDY_TASK, publish_export
from db.models import Study, StudyState, WorkerHeartbeat, utcnow
from db.session import make_engine, make_sessionmaker, session_scope
from db.transitions import move_state
from models.registry import TriageModel
from settings import Settings
from triage.policy import AI_UNAVAILABLE, Decision, Level
from triage.service import Scorer
from triage.site import site_settings
from worker.export import create_exports, run_export
from worker.heartbeat import HeartbeatThread, TaskCounter, WorkerIdentity
from worker.scoring import decide_study, final_state, pending_instances, run_pipeline_many, store_results

log = logging.getLogger("xray_triage.tasks")

# A message may overtake the commit of its own hand-off; how long to wait for that commit.
NOT_YET_RETRIES = 30
NOT_YET_COUNTDOWN_S = 1.0


class Claim(enum.Enum):
    STARTED = "started"
    STALE = "stale"
    NOT_YET = "not-yet"
    ELSEWHERE = "elsewhere"  # being scored by another live worker (claimed in its batch)


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    study_id: int | None = None


def _claimer_alive(session: Session, claimer: str | None, me: str | None, now: datetime, dead_after_s: float) -> bool:
    """Is another process, with a heartbeat seen within `dead_after_s`, holding this study?"""
    if claimer is None or claimer == me:
        return False
    seen = session.scalar(select(WorkerHeartbeat.last_seen_at).where(WorkerHeartbeat.name == claimer))
    return seen is not None and seen > now - timedelta(seconds=dead_after_s)


def begin_processing(
    session: Session,
    study_uid: str,
    generation: int,
    now: datetime,
    worker: str | None = None,
    dead_after_s: float = 45.0,
) -> ClaimResult:
    """queued -> processing for this generation, or say why not; `worker` (this process's
    heartbeat name) is recorded so that the sweeper can tell when the worker has died.

    A study already `processing` under the same generation is resumed when no live process
    holds it: that is the message redelivered after a worker died (acks_late).  One that a
    live worker claimed in its batch is left to it (ELSEWHERE).
    """
    row = session.execute(
        select(Study.id, Study.state, Study.handoff_generation, Study.processing_by).where(Study.study_uid == study_uid)
    ).first()
    if row is None:
        return ClaimResult(Claim.STALE)
    study_id, state, db_generation = int(row[0]), StudyState(row[1]), int(row[2])
    if generation > db_generation:
        return ClaimResult(Claim.NOT_YET, study_id)
    if generation < db_generation:
        return ClaimResult(Claim.STALE, study_id)
    if state is StudyState.PROCESSING:
        if _claimer_alive(session, row[3], worker, now, dead_after_s):
            return ClaimResult(Claim.ELSEWHERE, study_id)
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


@dataclass(frozen=True)
class Claimed:
    study_id: int
    study_uid: str
    generation: int


def claim_companions(
    session: Session, queues: list[str], urgent_queue: str, limit: int, now: datetime, worker: str, exclude: int
) -> list[Claimed]:
    """Up to `limit` more studies for this process's batch: first its own orphans (studies it
    claimed in a batch whose task is being retried), then studies waiting in `queues`, urgent
    first, oldest first; each claimed by a conditional transition, so concurrent claimers never
    share one."""
    if limit <= 0:
        return []
    out: list[Claimed] = []
    orphans = session.execute(
        select(Study.id, Study.study_uid, Study.handoff_generation)
        .where(Study.state == StudyState.PROCESSING, Study.processing_by == worker, Study.id != exclude)
        .order_by(Study.processing_at)
        .limit(limit)
    ).all()
    out += [Claimed(int(r[0]), str(r[1]), int(r[2])) for r in orphans]
    candidates = session.execute(
        select(Study.id, Study.study_uid, Study.handoff_generation)
        .where(Study.state == StudyState.QUEUED, Study.queue_name.in_(queues))
        .order_by(case((Study.queue_name == urgent_queue, 0), else_=1), Study.queued_at, Study.id)
        .limit(2 * limit)
    ).all()
    for r in candidates:
        if len(out) >= limit:
            break
        won = move_state(
            session,
            int(r[0]),
            StudyState.QUEUED,
            StudyState.PROCESSING,
            now,
            reason="claimed into a worker's batch",
            where=[Study.handoff_generation == int(r[2])],
            values={"processing_at": now, "processing_by": worker},
        )
        if won:
            out.append(Claimed(int(r[0]), str(r[1]), int(r[2])))
    return out


def finish_study(
    session: Session,
    study_id: int,
    generation: int,
    state: StudyState,
    reason: str | None,
    now: datetime,
    values: dict[str, Any] | None = None,
) -> bool:
    """processing -> a final state, unless the study was re-opened meanwhile (then False).

    Also stores the time from the end of the push (the association's release, else the last
    instance) to this commit: the time-to-notification /metrics reports."""
    ended = session.execute(select(Study.released_at, Study.last_instance_at).where(Study.id == study_id)).first()
    waited: float | None = None
    if ended is not None:
        end = ended[0] if ended[0] is not None and ended[0] >= ended[1] else ended[1]
        waited = max(0.0, (now - end).total_seconds())
    return move_state(
        session,
        study_id,
        StudyState.PROCESSING,
        state,
        now,
        reason=reason,
        where=[Study.handoff_generation == generation],
        values={"finished_at": now, "time_to_priority_s": waited, **(values or {})},
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
    exports: list[int] = field(default_factory=list)  # export rows written with the result, to publish


def score_claimed(
    factory: sessionmaker[Session], settings: Settings, model: TriageModel, study_id: int, generation: int
) -> Outcome:
    """Run the pipeline for a study this process holds in `processing`; store everything at once."""
    [outcome] = score_batch(factory, settings, model, [Claimed(study_id, "", generation)])
    return outcome


def score_batch(
    factory: sessionmaker[Session], settings: Settings, model: TriageModel, batch: list[Claimed]
) -> list[Outcome]:
    """Score studies this process holds in `processing` in shared forward passes; then store each
    study's results and final state in its own transaction (one study's conflict or re-opening
    never touches another's)."""
    from dicom_io.pixels import PIPELINE_VERSION

    base_model_path = settings.model.path

    started = utcnow()
    with factory() as session:
        settings = site_settings(session, settings)  # audited overrides take effect per batch
        if settings.model.path != base_model_path:
            model = scoring_model(settings)  # an admin promoted another model: loaded once, then cached
        works = [pending_instances(session, c.study_id, model.ref) for c in batch]
    scorer = Scorer(model, settings)  # thresholds and steering per population, once per batch
    all_rows = run_pipeline_many(scorer, works, settings)
    outcomes = []
    for claimed, work, rows in zip(batch, works, all_rows, strict=True):
        decision = decide_study(work, rows, scorer)
        state = final_state(decision)
        with session_scope(factory) as session:
            now = utcnow()
            store_results(session, work, rows, model.ref, PIPELINE_VERSION, started, now)
            applied = finish_study(
                session,
                claimed.study_id,
                claimed.generation,
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
                    "steering_findings": decision.steering_findings,
                },
            )
            exports: list[int] = []
            if applied and state is StudyState.SCORED:
                exports = create_exports(session, claimed.study_id, claimed.generation, model.ref, settings)
        outcomes.append(Outcome(state, decision, applied, exports))
    if settings.model.shadow_path:
        score_shadow(factory, settings, [c.study_id for c in batch], started)
    return outcomes


def score_shadow(factory: sessionmaker[Session], settings: Settings, study_ids: list[int], started: datetime) -> None:
    """Score the same studies with the shadow model and store its results under its own version.

    After the primary's results are committed, so the radiologist never waits for it; judged at
    its own card's thresholds (site thresholds are for the primary); no heatmaps, no state, no
    priority, no export.  A failure is logged and changes nothing."""
    from dicom_io.pixels import PIPELINE_VERSION
    from models.registry import get_model

    try:
        shadow = get_model(settings.model.shadow_path)
        if shadow.ref == scoring_model(settings).ref:
            return
        own = settings.model_copy(
            update={"triage": settings.triage.model_copy(update={"thresholds": {}, "critical_thresholds": {}})}
        )
        with factory() as session:
            works = [pending_instances(session, sid, shadow.ref) for sid in study_ids]
        rows = run_pipeline_many(Scorer(shadow, own), works, own, heatmaps=False)
        with session_scope(factory) as session:
            for work, study_rows in zip(works, rows, strict=True):
                store_results(session, work, study_rows, shadow.ref, PIPELINE_VERSION, started, utcnow())
    except Exception as exc:  # noqa: BLE001 - the shadow must never cost a study its result
        log.warning("shadow model: scoring failed, primary results unaffected: %s: %s", type(exc).__name__, exc)


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
                "steering_findings": None,
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


def _scores(app: Celery, settings: Settings) -> bool:
    """Does this worker consume a scoring queue (an export-only worker needs no model)?"""
    consumed = set(app.amqp.queues.consume_from)
    return bool(consumed & {settings.queues.urgent, settings.queues.routine}) or not consumed


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
        model_ref = _load_model(settings) if _scores(app, settings) else None
        process.heartbeat = _start_heartbeat(app, settings, model_ref, process.counter)

    @worker_process_shutdown.connect(weak=False)
    def _stop_heartbeat(**_kwargs: Any) -> None:
        if process.heartbeat is not None:
            process.heartbeat.stop()

    @app.task(name=PROCESS_STUDY_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def process_study(self: Task, study_uid: str, generation: int) -> str:
        claimed: ClaimResult | None = None
        batch: list[Claimed] = []
        factory = _factory(url)
        me = worker_name()
        try:
            with session_scope(factory) as session:
                claimed = begin_processing(session, study_uid, int(generation), utcnow(), me, cfg.dead_worker_after_s)
            if claimed.claim is Claim.NOT_YET:
                raise self.retry(countdown=NOT_YET_COUNTDOWN_S, max_retries=NOT_YET_RETRIES)
            if claimed.claim is Claim.STALE or claimed.study_id is None:
                log.info("study %s generation %s: stale message ignored", study_uid, generation)
                return Claim.STALE.value
            if claimed.claim is Claim.ELSEWHERE:
                log.info(
                    "study %s generation %s: already being scored in another worker's batch", study_uid, generation
                )
                return Claim.ELSEWHERE.value
            batch = [Claimed(claimed.study_id, study_uid, int(generation))]
            with session_scope(factory) as session:
                batch += claim_companions(
                    session, list(app.amqp.queues.consume_from), settings.queues.urgent,
                    cfg.batch_studies - 1, utcnow(), me, claimed.study_id,
                )  # fmt: skip
            outcomes = score_batch(factory, settings, scoring_model(settings), batch)
        except TRANSIENT_ERRORS as exc:
            # The companions stay `processing` by this process: the retry claims them again first.
            countdown = backoff_s(self.request.retries, cfg.retry_base_s, cfg.retry_cap_s)
            log.warning(
                "study %s generation %s: %s, retry %d in %.1f s",
                study_uid, generation, type(exc).__name__, self.request.retries + 1, countdown,
            )  # fmt: skip
            raise self.retry(exc=exc, countdown=countdown, max_retries=cfg.max_retries) from None
        except Retry:
            raise
        except Exception as exc:
            # No model, or a bug: retrying cannot help, and the studies must not sit in `processing`
            # until the sweeper re-queues them forever.  They go on the worklist, read as usual.
            if claimed is None or claimed.study_id is None:
                raise
            log.error("study %s generation %s: scoring failed: %s", study_uid, generation, type(exc).__name__)
            for c in batch or [Claimed(claimed.study_id, study_uid, int(generation))]:
                fail_claimed(factory, c.study_id, c.generation, f"AI error: {type(exc).__name__}: {exc}")
            process.counter.add(max(1, len(batch)))
            return StudyState.FAILED.value
        for c, outcome in zip(batch, outcomes, strict=True):
            log.info(
                "study %s generation %s: %s (%s)%s",
                c.study_uid, c.generation, outcome.state.value, outcome.decision.priority_reason,
                "" if outcome.applied else " (superseded)",
            )  # fmt: skip
        if len(batch) > 1:
            log.info("scored %d studies in one batch", len(batch))
        _publish_exports(app, settings, [e for outcome in outcomes for e in outcome.exports])
        process.counter.add(len(batch))  # the heartbeat thread writes it; no DB write on this path
        return outcomes[0].state.value

    @app.task(name=EXPORT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def export(self: Task, export_id: int) -> str:
        def publish(eid: int, countdown: float | None) -> None:
            publish_export(app, settings, eid, countdown)

        try:
            return run_export(_factory(url), settings, int(export_id), publish)
        except TRANSIENT_ERRORS as exc:  # the database is away: the row keeps its lease, try again
            countdown = backoff_s(self.request.retries, cfg.retry_base_s, cfg.retry_cap_s)
            raise self.retry(exc=exc, countdown=countdown, max_retries=cfg.max_retries) from None

    return process_study


def _publish_exports(app: Celery, settings: Settings, export_ids: list[int]) -> None:
    """Publish the export rows written with the results; a failure is left to the sweeper."""
    for export_id in export_ids:
        try:
            publish_export(app, settings, export_id)
        except Exception as exc:  # noqa: BLE001 - the row is pending: the sweeper re-publishes it
            log.warning("export %d not published (%s); the sweeper will", export_id, type(exc).__name__)
            return
