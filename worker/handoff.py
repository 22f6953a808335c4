"""Hand complete studies to the Celery queue: exactly once per stable state, never lost.

A study is complete when the association that sent its latest instance was released (the
sender said it is done) and the short release grace has passed with nothing new; otherwise,
when no instance has arrived for the stability window (aborted associations, senders that
stay connected or split a study across associations).  The listener wakes the hand-off at a
release, so the grace is all a released study waits.  The claim is
one conditional UPDATE (receiving -> queued, generation + 1) so that of several listeners or
threads scanning the same database exactly one wins.  The message is published *inside* the
claiming transaction and the transaction commits only after the broker accepted it: if
publishing fails the claim rolls back and the next scan tries again.  The worst case (commit
lost after a successful publish) is a duplicate message with the same generation, which the
worker recognises; a lost hand-off cannot happen.

The scan is driven by the database alone, so a listener restarted between receipt and
hand-off finds its pending studies again on its first scan.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Study, StudyState, utcnow
from db.session import session_scope
from db.transitions import move_state
from dicom_io.ingest import is_urgent
from settings import QueuesConfig, Settings
from worker.publish import ExportPublisher, Handoff, Publisher, celery_export_publisher, celery_publisher
from worker.sweeper import sweep_once

__all__ = [
    "Handoff",
    "HandoffThread",
    "Publisher",
    "celery_export_publisher",
    "celery_publisher",
    "queue_for",
    "scan_once",
]

log = logging.getLogger("xray_triage.handoff")

SCAN_BATCH = 100


def queue_for(requested_priority: str | None, queues: QueuesConfig, calling_ae: str | None = None) -> str:
    """STAT/HIGH requests, and studies from the configured urgent callers (e.g. the emergency
    department's room), go to the urgent queue so a separate worker pool can serve them first."""
    if calling_ae is not None and calling_ae.strip() in queues.urgent_calling_aes:
        return queues.urgent
    return queues.urgent if is_urgent(requested_priority) else queues.routine


@dataclass(frozen=True)
class Cutoffs:
    """A receiving study is due when quiet since `quiet`, or released by `released` with nothing after."""

    quiet: datetime
    released: datetime

    @classmethod
    def at(cls, now: datetime, window_s: float, grace_s: float) -> Cutoffs:
        return cls(now - timedelta(seconds=window_s), now - timedelta(seconds=grace_s))

    def due(self) -> ColumnElement[bool]:
        released = and_(
            Study.released_at.is_not(None),
            Study.released_at >= Study.last_instance_at,
            Study.released_at <= self.released,
        )
        return or_(Study.last_instance_at <= self.quiet, released)


def due_studies(
    session: Session, cutoffs: Cutoffs, limit: int = SCAN_BATCH
) -> list[tuple[int, str, str | None, str | None]]:
    """(id, Study UID, requested priority, calling AE) of studies due for hand-off, oldest first."""
    rows = session.execute(
        select(Study.id, Study.study_uid, Study.requested_priority, Study.calling_ae)
        .where(Study.state == StudyState.RECEIVING, cutoffs.due())
        .order_by(Study.last_instance_at)
        .limit(limit)
    ).all()
    return [(int(r[0]), str(r[1]), r[2], r[3]) for r in rows]


def claim_and_publish(
    factory: sessionmaker[Session],
    study_id: int,
    study_uid: str,
    queue: str,
    cutoffs: Cutoffs,
    now: datetime,
    publish: Publisher,
) -> Handoff | None:
    """Claim one study and publish it in one transaction; None if another scanner won or it got busy again.

    Exceptions from `publish` propagate after the claim is rolled back.
    """
    with session_scope(factory) as session:
        won = move_state(
            session,
            study_id,
            StudyState.RECEIVING,
            StudyState.QUEUED,
            now,
            where=[cutoffs.due()],
            values={"handoff_generation": Study.handoff_generation + 1, "queued_at": now, "queue_name": queue},
        )
        if not won:
            return None
        generation = int(session.scalar(select(Study.handoff_generation).where(Study.id == study_id)) or 0)
        handoff = Handoff(study_uid, generation, queue)
        publish(handoff)
        return handoff


def scan_once(
    factory: sessionmaker[Session],
    publish: Publisher,
    window_s: float,
    queues: QueuesConfig,
    now: datetime | None = None,
    grace_s: float = 0.5,
) -> list[Handoff]:
    """Hand off every study quiet for `window_s`, or released `grace_s` ago with nothing since;
    returns what was published.

    Stops at the first publish failure (the broker is probably down) and leaves the rest
    for the next scan.
    """
    now = now or utcnow()
    cutoffs = Cutoffs.at(now, window_s, grace_s)
    with factory() as session:
        candidates = due_studies(session, cutoffs)
    done: list[Handoff] = []
    for study_id, study_uid, priority, calling_ae in candidates:
        queue = queue_for(priority, queues, calling_ae)
        try:
            handoff = claim_and_publish(factory, study_id, study_uid, queue, cutoffs, now, publish)
        except Exception as exc:  # noqa: BLE001 - broker or database down: roll back, retry next scan
            log.warning("hand-off of study %s failed, will retry: %s: %s", study_uid, type(exc).__name__, exc)
            break
        if handoff is not None:
            log.info("study %s queued on %s (generation %d)", study_uid, queue, handoff.generation)
            done.append(handoff)
    return done


class HandoffThread(threading.Thread):
    """Runs scan_once every poll interval, and at the end of each release's grace, until
    stopped; survives database and broker outages."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        publish: Publisher,
        publish_export: ExportPublisher | None = None,
    ) -> None:
        super().__init__(name="xray-triage-handoff", daemon=True)
        self.settings = settings
        self.factory = factory
        self.publish = publish
        self.publish_export = publish_export
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._scan_at: list[float] = []  # monotonic times at which a released study falls due

    def released(self) -> None:
        """An association was released: scan once its grace has passed (called by the listener)."""
        with self._lock:
            self._scan_at.append(time.monotonic() + self.settings.handoff.release_grace_s)
        self._wake.set()

    def _sleep(self) -> None:
        """Until the next poll, or the end of the earliest pending grace if sooner."""
        deadline = time.monotonic() + self.settings.handoff.poll_interval_s
        while not self._stop_event.is_set():
            with self._lock:
                now = time.monotonic()
                due = [t for t in self._scan_at if t <= now]
                self._scan_at = [t for t in self._scan_at if t > now]
                until = min([deadline, *self._scan_at])
            if due or now >= deadline:
                return
            self._wake.wait(until - now)
            self._wake.clear()

    def run(self) -> None:
        cfg = self.settings.handoff
        next_sweep = 0.0
        while not self._stop_event.is_set():
            try:
                scan_once(
                    self.factory, self.publish, cfg.stability_window_s, self.settings.queues,
                    grace_s=cfg.release_grace_s,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - e.g. database unreachable; keep scanning
                log.warning("hand-off scan failed, will retry: %s: %s", type(exc).__name__, exc)
            # The sweeper lives here so that every process that receives studies also rescues them.
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.settings.worker.sweep_interval_s
                try:
                    sweep_once(self.factory, self.publish, self.settings, publish_export=self.publish_export)
                except Exception as exc:  # noqa: BLE001 - same: keep sweeping
                    log.warning("sweep failed, will retry: %s: %s", type(exc).__name__, exc)
            self._sleep()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_event.set()
        self._wake.set()
        self.join(timeout)
