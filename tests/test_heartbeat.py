"""Worker heartbeats on both databases: the upsert, staleness, and a thread that outlives DB errors.

Rows are written under names unique to each test and deleted afterwards: on PostgreSQL the
session database is shared with other suites, whose health checks read every heartbeat row.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from db.heartbeats import beat, read_heartbeats
from db.models import WorkerHeartbeat, utcnow
from db.session import make_engine, make_sessionmaker, session_scope
from tests.plugins.ingest import Backend, wait_for
from worker.heartbeat import HeartbeatThread, TaskCounter, WorkerIdentity

PREFIX = "hb-test-"
INTERVAL_S = 0.05


@pytest.fixture
def factory(backend: Backend) -> Iterator[sessionmaker[Session]]:
    """Sessions on the migrated test database; this test's heartbeat rows are removed afterwards."""
    engine = make_engine(backend.database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        WorkerHeartbeat.__table__.create(engine, checkfirst=True)  # a test that dropped it puts it back
        with engine.begin() as conn:
            conn.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name.like(f"{PREFIX}%")))
        engine.dispose()


def _name() -> str:
    return f"{PREFIX}{secrets.token_hex(4)}:4242"


def _row(factory: sessionmaker[Session], name: str) -> WorkerHeartbeat | None:
    with factory() as s:
        return s.get(WorkerHeartbeat, name)


def _mine(rows: list[dict], name: str) -> dict:
    (row,) = [r for r in rows if r["name"] == name]
    return row


def test_upsert_keeps_one_row_and_advances_last_seen(factory: sessionmaker[Session]) -> None:
    name, t0 = _name(), utcnow()
    with session_scope(factory) as s:
        beat(s, name, "host", 4242, ["q.urgent", "q.routine"], "default@1.0.0", t0, started_at=t0)
    with session_scope(factory) as s:
        beat(s, name, "host", 4242, "q.urgent,q.routine", "default@1.0.0", t0 + timedelta(seconds=15), 3)
    with session_scope(factory) as s:
        beat(s, name, "host", 4242, "q.urgent,q.routine", "default@1.0.0", t0 + timedelta(seconds=30), 2)
    with factory() as s:
        rows = s.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.name == name)).all()
    assert len(rows) == 1
    (row,) = rows
    assert (row.hostname, row.pid, row.queues, row.model_ref) == ("host", 4242, "q.urgent,q.routine", "default@1.0.0")
    assert row.started_at == t0 and row.last_seen_at == t0 + timedelta(seconds=30)
    assert row.tasks_done == 5


def test_a_restarted_process_with_the_same_name_starts_its_row_afresh(factory: sessionmaker[Session]) -> None:
    name, t0 = _name(), utcnow()
    with session_scope(factory) as s:
        beat(s, name, "host", 4242, "q", "m@1", t0, 7, started_at=t0)
    restart = t0 + timedelta(hours=1)
    with session_scope(factory) as s:
        beat(s, name, "host", 4242, "q", "m@2", restart, started_at=restart)
    row = _row(factory, name)
    assert row is not None
    assert (row.started_at, row.tasks_done, row.model_ref) == (restart, 0, "m@2")


def test_a_stale_row_reads_as_not_alive(factory: sessionmaker[Session]) -> None:
    name, t0 = _name(), utcnow()
    with session_scope(factory) as s:
        beat(s, name, "host", 4242, "q", None, t0, started_at=t0)
    with factory() as s:
        fresh = _mine(read_heartbeats(s, t0 + timedelta(seconds=10), stale_after_s=90), name)
        stale = _mine(read_heartbeats(s, t0 + timedelta(seconds=120), stale_after_s=90), name)
    assert fresh["alive"] is True and fresh["age_s"] == pytest.approx(10)
    assert stale["alive"] is False and stale["age_s"] == pytest.approx(120)
    assert (stale["hostname"], stale["pid"], stale["queues"], stale["model_ref"]) == ("host", 4242, "q", None)
    assert stale["started_at"] == t0 and stale["tasks_done"] == 0


def _thread(factory: sessionmaker[Session], name: str, counter: TaskCounter | None = None) -> HeartbeatThread:
    identity = WorkerIdentity(name, "host", 4242, "q.urgent,q.routine", "default@1.0.0")
    return HeartbeatThread(factory, identity, INTERVAL_S, counter)


def test_the_thread_writes_its_row_and_the_tasks_counted(factory: sessionmaker[Session]) -> None:
    name, counter = _name(), TaskCounter()
    thread = _thread(factory, name, counter)
    thread.start()
    try:
        first = wait_for(lambda: _row(factory, name), what="the first heartbeat")
        counter.add(3)
        wait_for(lambda: (r := _row(factory, name)) is not None and r.tasks_done == 3, what="the counted tasks")
        wait_for(lambda: (r := _row(factory, name)) is not None and r.last_seen_at > first.last_seen_at,
                 what="a later beat")  # fmt: skip
    finally:
        thread.stop()
    assert not thread.is_alive()
    assert counter.pending == 0


def test_the_thread_survives_a_database_error_and_recovers(factory: sessionmaker[Session]) -> None:
    name, counter = _name(), TaskCounter()
    engine = factory.kw["bind"]
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE worker_heartbeat"))
    thread = _thread(factory, name, counter)
    thread.start()
    try:
        counter.add(2)
        wait_for(lambda: thread.failures >= 3, what="the heartbeat to fail a few times")
        assert thread.is_alive(), "a database error stopped the heartbeat thread"
        assert counter.pending == 2, "tasks counted during the outage were lost"
        WorkerHeartbeat.__table__.create(engine)
        row = wait_for(lambda: _row(factory, name), what="the heartbeat after the table came back")
        assert row.tasks_done == 2
    finally:
        thread.stop()


def test_the_thread_survives_an_unreachable_database(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="xray_triage.heartbeat")
    broken = make_sessionmaker(make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere"))
    thread = _thread(broken, _name())
    thread.start()
    try:
        wait_for(lambda: thread.failures >= 3, what="the heartbeat to fail a few times")
        assert thread.is_alive() and thread.beats == 0
    finally:
        thread.stop()
    assert not thread.is_alive()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, "one warning per outage, not one per interval"
    assert "OperationalError" in warnings[0].getMessage()
