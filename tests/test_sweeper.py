"""A lost message cannot lose a study: the sweeper re-queues what sits in queued/processing too long.

The unit tests drive ``sweep_once`` on the real database; the outage test loses every queued
message for real, with a Redis server of its own (no persistence) stopped and started again
while studies wait, and a real worker that then scores every study exactly once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from db.models import InstanceResult, Study, StudyState, utcnow
from db.session import make_engine, make_sessionmaker, session_scope, upgrade
from tests.conftest import free_port, pydicom_data_file
from tests.plugins.ingest import storescu, wait_for
from tests.plugins.scoring import (
    ScoringEnv,
    as_new_study,
    scoring_settings,
    start_env_worker,
    study_uid_of,
)
from worker.handoff import Handoff, scan_once
from worker.sweeper import sweep_once


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[Handoff] = []
        self.fail = fail

    def __call__(self, handoff: Handoff) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.sent.append(handoff)


def _age(url: str, uid: str, seconds: float) -> None:
    factory = make_sessionmaker(make_engine(url))
    with session_scope(factory) as s:
        s.execute(
            update(Study).where(Study.study_uid == uid).values(state_changed_at=utcnow() - timedelta(seconds=seconds))
        )


def test_sweeper_requeues_stuck_studies_with_a_new_generation(backend, tmp_path, start_listener) -> None:
    settings = scoring_settings(backend.database_url, backend.broker_url, tmp_path, "unit")
    handle = start_listener(settings, with_handoff=False)
    files = [as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / f"{i}.dcm") for i in range(3)]
    for f in files:
        assert storescu(handle.port, [f]).returncode == 0
    uids = [study_uid_of(f) for f in files]
    factory = make_sessionmaker(make_engine(settings.database.url))
    scan_once(factory, Recorder(), 0.5, settings.queues, now=utcnow() + timedelta(hours=1))
    fresh, lost_queued, lost_processing = uids
    with session_scope(factory) as s:
        s.execute(update(Study).where(Study.study_uid == lost_processing).values(state=StudyState.PROCESSING))
    _age(settings.database.url, lost_queued, settings.worker.queued_timeout_s + 1)
    _age(settings.database.url, lost_processing, settings.worker.processing_timeout_s + 1)

    # Broker down: nothing changes, the next sweep tries again.
    assert sweep_once(factory, Recorder(fail=True), settings) == 0
    with factory() as s:
        assert set(s.scalars(select(Study.handoff_generation).where(Study.study_uid.in_(uids)))) == {1}

    sent = Recorder()
    assert sweep_once(factory, sent, settings) == 2
    assert {(h.study_uid, h.generation) for h in sent.sent} == {(lost_queued, 2), (lost_processing, 2)}
    with factory() as s:
        states = dict(s.execute(select(Study.study_uid, Study.state).where(Study.study_uid.in_(uids))).all())
        reasons = s.scalars(select(Study.state_reason).where(Study.study_uid == lost_processing)).one()
    assert states == {fresh: StudyState.QUEUED, lost_queued: StudyState.QUEUED, lost_processing: StudyState.QUEUED}
    assert "re-queued by the sweeper: processing" in reasons
    assert sweep_once(factory, Recorder(), settings) == 0  # just re-queued: not stuck any more


class RedisServer:
    """A redis-server of this test's own, without persistence, that can be stopped and started."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), what="redis-server to start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


def test_messages_lost_with_redis_are_requeued_and_every_study_scored_once(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    from xray_triage.services import start_intake

    url = f"sqlite:///{tmp_path / 'xray-triage.db'}"
    upgrade(url)
    settings = scoring_settings(url, own_redis.url, tmp_path, "redis", worker={"queued_timeout_s": 5.0})
    env = ScoringEnv("redis", settings, tmp_path)
    env.listener = start_intake(settings)
    try:
        files = [as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / f"r{i}.dcm") for i in range(3)]
        for f in files:
            env.push([f])
        uids = [study_uid_of(f) for f in files]
        wait_for(lambda: all(env.state_of(u) == StudyState.QUEUED for u in uids), what="all studies queued")
        client = redis.Redis.from_url(own_redis.url)
        assert sum(client.llen(q) for q in (settings.queues.urgent, settings.queues.routine)) >= 3

        own_redis.stop()  # no persistence: the three messages are gone
        own_redis.start()
        assert all(env.state_of(u) == StudyState.QUEUED for u in uids)

        env.worker = start_env_worker(env)
        for uid in uids:
            study = env.wait_final(uid)
            assert study.state == StudyState.SCORED
            assert study.handoff_generation >= 2  # scored from a message the sweeper published
            assert "re-queued by the sweeper: queued" in " ".join(str(r) for r in env.transition_reasons(uid))
        with env.factory() as s:
            rows = s.execute(select(InstanceResult.instance_id, InstanceResult.model_ref)).all()
        assert len(rows) == len(set(rows)) == 3
    finally:
        for stop in reversed(env.cleanup):
            stop()
        env.listener.stop()
        env.factory.kw["bind"].dispose()


def test_a_dead_workers_study_is_requeued_once_within_a_minute_and_old_heartbeats_expire(
    backend, tmp_path, start_listener
) -> None:
    from db.models import WorkerHeartbeat

    settings = scoring_settings(backend.database_url, backend.broker_url, tmp_path, "dead")
    handle = start_listener(settings, with_handoff=False)
    files = [as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / f"w{i}.dcm") for i in range(2)]
    for f in files:
        assert storescu(handle.port, [f]).returncode == 0
    dead_ones, live_ones = (study_uid_of(f) for f in files)
    factory = make_sessionmaker(make_engine(settings.database.url))
    now = utcnow()
    minute_ago = now - timedelta(seconds=60)
    with session_scope(factory) as s:
        s.execute(update(WorkerHeartbeat).values(last_seen_at=now))  # other tests' rows on a shared database
        for name, seen in (("host:111", minute_ago), ("host:222", now), ("host:333", now - timedelta(days=2))):
            s.add(WorkerHeartbeat(name=name, hostname="host", pid=int(name[-3:]), queues="q", model_ref=None,
                                  started_at=seen, last_seen_at=seen))  # fmt: skip
        for uid, worker in ((dead_ones, "host:111"), (live_ones, "host:222")):
            s.execute(
                update(Study)
                .where(Study.study_uid == uid)
                .values(state=StudyState.PROCESSING, processing_by=worker, state_changed_at=minute_ago)
            )
    assert settings.worker.dead_worker_after_s < 60 < settings.worker.processing_timeout_s

    sent = Recorder()
    assert sweep_once(factory, sent, settings, now=now) == 1
    assert [(h.study_uid, h.generation) for h in sent.sent] == [(dead_ones, 1)]  # never handed off before: 0 + 1
    with factory() as s:
        state, reason = s.execute(select(Study.state, Study.state_reason).where(Study.study_uid == dead_ones)).one()
        live_state = s.scalar(select(Study.state).where(Study.study_uid == live_ones))
        names = set(s.scalars(select(WorkerHeartbeat.name)))
    assert state == StudyState.QUEUED and "heartbeat stopped" in reason
    assert live_state == StudyState.PROCESSING  # its worker is alive: left alone
    assert "host:333" not in names and {"host:111", "host:222"} <= names  # two days silent: forgotten
    assert sweep_once(factory, Recorder(), settings, now=now) == 0  # exactly once
