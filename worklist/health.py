"""Is the system working?  Listener (a real C-ECHO), database, broker and workers, for /healthz and the admin page.

Each check has its own short timeout and turns any error into a reason, so a health probe
answers quickly with what is down instead of hanging on the part that is.
"""

from __future__ import annotations

import concurrent.futures
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from db.heartbeats import read_heartbeats
from settings import Settings

CHECK_TIMEOUT_S = 3.0
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health")


def bounded(fn: Any, *args: Any) -> dict[str, Any]:
    future = _POOL.submit(fn, *args)
    try:
        return {"ok": True, **(future.result(timeout=CHECK_TIMEOUT_S) or {})}
    except concurrent.futures.TimeoutError:
        return {"ok": False, "error": f"no answer within {CHECK_TIMEOUT_S:.0f} s"}
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def _database(factory: sessionmaker[Session]) -> dict[str, Any]:
    with factory() as session:
        session.execute(text("SELECT 1"))
    return {}


_CELERY_APPS: dict[str, Any] = {}


def broker_check(settings: Settings) -> dict[str, Any]:
    from broker import make_celery, queue_depths

    # One Celery app per broker URL for the process: a monitoring probe every few seconds
    # should not rebuild the app (and its connection pool) each time.
    app = _CELERY_APPS.get(settings.broker.url)
    if app is None:
        app = _CELERY_APPS.setdefault(settings.broker.url, make_celery(settings))
    return {"queues": queue_depths(app, [settings.queues.urgent, settings.queues.routine, settings.export.queue])}


def workers(session: Session, now: datetime, stale_after_s: float) -> list[dict[str, Any]]:
    """Heartbeat rows as plain JSON-ready data (``db.heartbeats.read_heartbeats``)."""
    out = []
    for hb in read_heartbeats(session, now, stale_after_s):
        out.append(
            {
                "name": hb["name"],
                "queues": hb["queues"].split(",") if hb["queues"] else [],
                "model": hb["model_ref"],
                "started_at": hb["started_at"].isoformat(),
                "last_seen_at": hb["last_seen_at"].isoformat(),
                "age_s": round(hb["age_s"], 1),
                "alive": hb["alive"],
                "tasks_done": hb["tasks_done"],
            }
        )
    return out


def _workers(factory: sessionmaker[Session], now: datetime, stale_after_s: float) -> dict[str, Any]:
    with factory() as session:
        rows = workers(session, now, stale_after_s)
    alive = [w for w in rows if w["alive"]]
    if not alive:
        raise RuntimeError(f"no worker heartbeat in the last {stale_after_s:.0f} s")
    return {"alive": len(alive), "workers": rows}


def _listener(settings: Settings) -> dict[str, Any]:
    from dicom_io.echo import echo_listener

    return {"echo": echo_listener(settings.listener, timeout_s=CHECK_TIMEOUT_S - 0.5)}


def health(settings: Settings, factory: sessionmaker[Session], now: datetime) -> dict[str, Any]:
    checks = {
        "listener": bounded(_listener, settings),
        "database": bounded(_database, factory),
        "broker": bounded(broker_check, settings),
        "workers": bounded(_workers, factory, now, settings.web.worker_stale_s),
    }
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}
