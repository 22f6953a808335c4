"""Worker heartbeat rows: written by each worker pool process, read by health checks.

Kept with the database (not with the worker) because the web app reads them too, and the web
app never imports the worker: it learns whether workers live from their rows alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import WorkerHeartbeat
from db.session import dialect_insert

_COLUMNS = ("name", "hostname", "pid", "queues", "model_ref", "started_at", "last_seen_at", "tasks_done")


def beat(
    session: Session,
    name: str,
    hostname: str,
    pid: int,
    queues: str | Sequence[str],
    model_ref: str | None,
    now: datetime,
    tasks_done_increment: int = 0,
    *,
    started_at: datetime | None = None,
) -> None:
    """Insert or refresh the worker's row in one statement (no read-then-write race).

    ``tasks_done_increment`` is added to the stored count, so a beat that failed can hand its
    increment to the next one without double counting.  Passing ``started_at`` (a process's
    first beat) restarts the row: a new process that reuses a dead one's host:pid name must
    not inherit its start time or its count.  The caller commits.
    """
    queue_list = queues if isinstance(queues, str) else ",".join(queues)
    stmt = dialect_insert(session, WorkerHeartbeat).values(
        name=name,
        hostname=hostname,
        pid=pid,
        queues=queue_list,
        model_ref=model_ref,
        started_at=started_at or now,
        last_seen_at=now,
        tasks_done=tasks_done_increment,
    )
    refreshed: dict[str, Any] = {
        "hostname": stmt.excluded.hostname,
        "pid": stmt.excluded.pid,
        "queues": stmt.excluded.queues,
        "model_ref": stmt.excluded.model_ref,
        "last_seen_at": stmt.excluded.last_seen_at,
    }
    if started_at is not None:
        refreshed |= {"started_at": stmt.excluded.started_at, "tasks_done": stmt.excluded.tasks_done}
    else:
        refreshed["tasks_done"] = WorkerHeartbeat.__table__.c.tasks_done + stmt.excluded.tasks_done
    session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=refreshed))


def read_heartbeats(session: Session, now: datetime, stale_after_s: float) -> list[dict[str, Any]]:
    """Every worker row, by name, with ``age_s`` and ``alive`` (seen within ``stale_after_s``).

    A dead worker's row is kept, not deleted: "missing since 10:42" is what an admin needs.
    """
    rows = session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.name)).all()
    out = []
    for row in rows:
        age_s = (now - row.last_seen_at).total_seconds()
        out.append({**{c: getattr(row, c) for c in _COLUMNS}, "age_s": age_s, "alive": age_s <= stale_after_s})
    return out
