"""The Celery application, built from the one Settings object.

The same code runs on the embedded broker (kombu's SQLAlchemy transport on a SQLite file:
durable, no server) and on Redis in production.  Messages carry identifiers only, never
pixel data, and are acknowledged late so a worker that dies mid-task leaves its message for
another worker.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from settings import Settings

PROCESS_STUDY_TASK = "xray_triage.process_study"
# One message per (study, destination): the export row's id.  Its own queue, so a slow or dead
# destination never holds up scoring.
EXPORT_TASK = "xray_triage.export"


def make_celery(settings: Settings) -> Celery:
    url = settings.broker.url
    transport = None
    if url.startswith("sqla+sqlite:///"):
        Path(url.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # The same transport with a shorter poll (broker.sqlite_transport); kombu takes the
        # transport from a "sqla+" prefix, so the URL goes without it and names the class instead.
        url, transport = url.removeprefix("sqla+"), "broker.sqlite_transport:Transport"
    app = Celery("xray_triage", broker=url, set_as_current=False)
    if transport is not None:
        app.conf.broker_transport = transport
    exchange = Exchange("xray-triage", type="direct", durable=True)
    app.conf.update(
        task_queues=[
            Queue(settings.queues.urgent, exchange, routing_key=settings.queues.urgent, durable=True),
            Queue(settings.queues.routine, exchange, routing_key=settings.queues.routine, durable=True),
            Queue(settings.export.queue, exchange, routing_key=settings.export.queue, durable=True),
        ],
        task_default_queue=settings.queues.routine,
        task_default_exchange="xray-triage",
        task_default_routing_key=settings.queues.routine,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
        # Each pool process loads TensorFlow and the model in worker_process_init, before it
        # reports UP; celery's default 4 s would kill it as hung on a busy machine, forever.
        worker_proc_alive_timeout=300.0,
    )
    if settings.broker.url.startswith("sqla+"):
        # kombu's SQL transport hands every transport option to sqlalchemy.create_engine(), which
        # rejects unknown ones (visibility_timeout, polling_interval), so it gets none; its poll
        # interval comes from broker.sqlite_transport instead.
        app.conf.broker_transport_options = {}
    return app


def publish_export(app: Celery, settings: Settings, export_id: int, countdown_s: float | None = None) -> None:
    """Queue the sending of one export row (also what the web app's "retry now" does)."""
    app.send_task(EXPORT_TASK, args=[export_id], queue=settings.export.queue, countdown=countdown_s)


def queue_depths(app: Celery, queue_names: list[str]) -> dict[str, int | None]:
    """Messages waiting per queue (None where the broker cannot tell)."""
    depths: dict[str, int | None] = {}
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.default_channel
        for name in queue_names:
            try:
                depths[name] = channel.queue_declare(queue=name, passive=True).message_count
            except Exception:  # noqa: BLE001 - a queue never declared simply has no depth yet
                depths[name] = None
    return depths
