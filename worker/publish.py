"""The hand-off message: what the hand-off and the sweeper publish and the worker consumes.

Identifiers only, never pixels: (Study UID, hand-off generation) on the urgent or routine
queue.  Its own module so the hand-off and the sweeper, which both publish, depend on it
and not on each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery

from broker import PROCESS_STUDY_TASK, publish_export
from settings import Settings


@dataclass(frozen=True)
class Handoff:
    study_uid: str
    generation: int
    queue: str


Publisher = Callable[[Handoff], None]


def celery_publisher(app: Celery) -> Publisher:
    """Publish a hand-off as the process_study task message."""

    def publish(handoff: Handoff) -> None:
        app.send_task(PROCESS_STUDY_TASK, args=[handoff.study_uid, handoff.generation], queue=handoff.queue)

    return publish


# Publishes one export row's id on the export queue (the sweeper re-publishes lost ones).
ExportPublisher = Callable[[int], None]


def celery_export_publisher(app: Celery, settings: Settings) -> ExportPublisher:
    def publish(export_id: int) -> None:
        publish_export(app, settings, export_id)

    return publish
