"""Worker heartbeats: one row per worker pool process, refreshed while it runs.

The admin page and ``/healthz`` need to tell a live worker from one that died or hung, and a
queue that nobody consumes from from one that is merely quiet; Celery's own heartbeats need
broadcast support the embedded SQL broker lacks, so each pool process writes its own row to
the database it already uses.  A heartbeat is bookkeeping, never a reason to stop scoring:
the thread swallows (and logs) every database error and tries again next interval.

The task's hot path never touches the database for this: it bumps an in-process
``TaskCounter`` and the thread adds what accumulated with its next beat.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from db.heartbeats import beat
from db.models import utcnow
from db.session import session_scope

log = logging.getLogger("xray_triage.heartbeat")


class TaskCounter:
    """Studies processed since the last successful beat; the task adds, the heartbeat takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._pending += n

    def take(self) -> int:
        with self._lock:
            n, self._pending = self._pending, 0
            return n

    @property
    def pending(self) -> int:
        return self._pending


@dataclass(frozen=True)
class WorkerIdentity:
    """What a heartbeat row says about its process (the row's key is ``name``)."""

    name: str
    hostname: str
    pid: int
    queues: str
    model_ref: str | None


class HeartbeatThread(threading.Thread):
    """Beats at once, then every ``interval_s`` until ``stop()``; never raises, never stops on DB errors.

    A daemon thread, so a pool process that exits without ``stop()`` (killed, recycled) is not
    kept alive by it; its row simply goes stale.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        identity: WorkerIdentity,
        interval_s: float,
        counter: TaskCounter | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(name="xray-triage-heartbeat", daemon=True)
        self.factory = factory
        self.identity = identity
        self.interval_s = interval_s
        self.counter = counter or TaskCounter()
        self.clock = clock
        self.started_at = clock()
        self.beats = 0  # successful beats, for tests and diagnostics
        self.failures = 0  # failed beats since start
        self._registered = False  # False until the first beat that restarts the row has committed
        self._failing = False  # inside an outage: the warning has been logged
        self._stopping = threading.Event()

    def run(self) -> None:
        while True:
            self.beat_once()
            if self._stopping.wait(self.interval_s):
                return

    def stop(self, timeout: float | None = 5.0) -> None:
        """Ask the thread to end and wait a little: a hung DB connect must not hold up shutdown."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)

    def beat_once(self) -> bool:
        """One beat; on any error the counted tasks go back to the counter for the next one."""
        increment = self.counter.take()
        ident = self.identity
        try:
            with session_scope(self.factory) as session:
                beat(
                    session, ident.name, ident.hostname, ident.pid, ident.queues, ident.model_ref, self.clock(),
                    increment, started_at=None if self._registered else self.started_at,
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a heartbeat must never take the worker down
            self.counter.add(increment)
            self._failed(exc)
            return False
        if self._failing:
            log.info("heartbeat %s written again", ident.name)
        self._failing = False
        self._registered = True
        self.beats += 1
        return True

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        # Warn once per outage: a line every interval while the database is down floods the log.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "heartbeat %s not written (%s); scoring continues", self.identity.name, type(exc).__name__)
