"""The `xray_triage.process_study` task: claim a queued study and carry it to a final state.

A message carries (Study UID, hand-off generation).  The generation lets the worker tell a
current message from a stale one: the study may have received new instances (and been
re-queued with a higher generation) since this message was published, or a message may have
been delivered twice.  Stale messages are acknowledged and ignored.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from celery import Celery, Task
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Study, StudyState, utcnow
from db.session import make_engine, make_sessionmaker, session_scope
from db.transitions import move_state
from worker.celery_app import PROCESS_STUDY_TASK
from worker.config import Settings

log = logging.getLogger("xray_triage.tasks")

NO_SCORER_REASON = "AI scoring not installed yet – read as usual"
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


def begin_processing(session: Session, study_uid: str, generation: int, now: datetime) -> ClaimResult:
    """queued -> processing for this generation, or say why not.

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
        return ClaimResult(Claim.STARTED, study_id)
    won = move_state(
        session,
        study_id,
        StudyState.QUEUED,
        StudyState.PROCESSING,
        now,
        where=[Study.handoff_generation == generation],
        values={"processing_at": now},
    )
    return ClaimResult(Claim.STARTED if won else Claim.STALE, study_id)


def finish_study(
    session: Session, study_id: int, generation: int, state: StudyState, reason: str | None, now: datetime
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
        values={"finished_at": now},
    )


@cache
def _factory(url: str) -> sessionmaker[Session]:
    # Created lazily inside each worker process (after the prefork fork), one per process.
    return make_sessionmaker(make_engine(url, hide_parameters=True))


def register_tasks(app: Celery, settings: Settings) -> Task:
    """Register process_study on `app`; returns the task object."""
    url = settings.database.url

    @app.task(name=PROCESS_STUDY_TASK, bind=True, acks_late=True, max_retries=NOT_YET_RETRIES)
    def process_study(self: Task, study_uid: str, generation: int) -> str:
        factory = _factory(url)
        with session_scope(factory) as session:
            claimed = begin_processing(session, study_uid, int(generation), utcnow())
        if claimed.claim is Claim.NOT_YET:
            raise self.retry(countdown=NOT_YET_COUNTDOWN_S)
        if claimed.claim is Claim.STALE:
            log.info("study %s generation %s: stale message ignored", study_uid, generation)
            return Claim.STALE.value
        if claimed.study_id is None:
            return Claim.STALE.value
        final, reason = score_study(study_uid)
        with session_scope(factory) as session:
            done = finish_study(session, claimed.study_id, int(generation), final, reason, utcnow())
        log.info("study %s generation %s: %s%s", study_uid, generation, final.value, "" if done else " (superseded)")
        return final.value

    return process_study


# ---- Issue 5 replaces this function: eligibility -> pixel path -> model -> scores. -------------
def score_study(study_uid: str) -> tuple[StudyState, str | None]:
    """Placeholder until the scoring pipeline exists: every study ends as failed, read as usual."""
    return StudyState.FAILED, NO_SCORER_REASON

