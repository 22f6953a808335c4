"""What a running xray-triage is made of, wired together: the only place that knows them all.

The DICOM listener (``dicom_io``) receives and records; the hand-off (``worker.handoff``)
queues studies that have gone quiet.  They are separate rooms that never import each other;
``xray-triage listen`` runs both in one process, started and stopped here.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

from broker import make_celery
from db.session import make_sessionmaker
from dicom_io.listener import ListenerHandle
from dicom_io.listener import start as start_listener
from settings import Settings
from worker.handoff import HandoffThread, celery_export_publisher, celery_publisher


@dataclass
class Intake:
    """The listener and (unless paused) the hand-off that drains what it receives into the queue."""

    listener: ListenerHandle
    handoff: HandoffThread | None
    _stopped: bool = field(default=False)

    @property
    def host(self) -> str:
        return self.listener.host

    @property
    def port(self) -> int:
        return self.listener.port

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.handoff is not None:
            self.handoff.stop()
        self.listener.stop()


def start_intake(settings: Settings, *, with_handoff: bool = True) -> Intake:
    """Start the listener and the hand-off thread in the background; returns at once.

    ``with_handoff=False`` receives without queueing (tests and benchmarks that release a
    backlog later).  The hand-off shares the listener's database pool.
    """
    listener = start_listener(settings)
    handoff = None
    if with_handoff:
        try:
            factory = make_sessionmaker(listener.engine)
            app = make_celery(settings)
            handoff = HandoffThread(settings, factory, celery_publisher(app), celery_export_publisher(app, settings))
            handoff.start()
            listener.scp.on_released = handoff.released  # a released study is due after its grace
        except BaseException:
            listener.stop()
            raise
    return Intake(listener, handoff)


def serve_intake(settings: Settings) -> None:
    """Run listener and hand-off until SIGINT or SIGTERM (what `xray-triage listen` does)."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    intake = start_intake(settings)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        intake.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
