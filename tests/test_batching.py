"""Batching across studies: a task scores its own study and others already waiting, in shared
forward passes, and every study is still scored exactly once.

The claim rules run on both databases (claim order, concurrent claimers, a message for a study
in another live worker's batch, a batch left behind by a retried task); a real worker then
drains a backlog in batches.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from db.models import StateTransition, Study, StudyState, WorkerHeartbeat, utcnow
from db.session import make_engine, make_sessionmaker, session_scope
from tests.conftest import pydicom_data_file
from tests.plugins.ingest import storescu, wait_for
from tests.plugins.scoring import FINAL, as_new_study, open_scoring_env, start_env_worker, study_uid_of
from worker.handoff import Handoff, scan_once
from worker.tasks import Claim, begin_processing, claim_companions


def _queued_studies(backend, tmp_path: Path, start_listener, n: int) -> tuple[object, list[str], object]:
    settings = backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    source = pydicom_data_file("RG1_UNCR.dcm")
    files = [as_new_study(source, tmp_path / f"s{i}.dcm") for i in range(n)]
    for f in files:  # one association each, in order: their queued_at order is the push order
        assert storescu(handle.port, [f]).returncode == 0
    factory = make_sessionmaker(make_engine(settings.database.url))
    sent: list[Handoff] = []
    scan_once(factory, sent.append, 5.0, settings.queues, now=utcnow() + timedelta(hours=1))
    assert len(sent) == n
    return settings, [study_uid_of(f) for f in files], factory


def _claims(factory, settings, limit: int, worker: str, exclude: int = -1) -> list[str]:
    queues = [settings.queues.urgent, settings.queues.routine]
    with session_scope(factory) as s:
        return [
            c.study_uid for c in claim_companions(s, queues, settings.queues.urgent, limit, utcnow(), worker, exclude)
        ]


def test_companions_are_claimed_urgent_first_then_oldest_and_never_twice(backend, tmp_path, start_listener) -> None:
    settings, uids, factory = _queued_studies(backend, tmp_path, start_listener, 5)
    with session_scope(factory) as s:  # the last one arrived from the emergency room
        s.execute(update(Study).where(Study.study_uid == uids[4]).values(queue_name=settings.queues.urgent))
    first = _claims(factory, settings, 3, "host-a:1")
    assert first == [uids[4], uids[0], uids[1]]
    second = _claims(factory, settings, 10, "host-b:2")
    assert second == [uids[2], uids[3]]
    assert _claims(factory, settings, 10, "host-c:3") == []
    with factory() as s:
        rows = s.execute(select(Study.study_uid, Study.state, Study.processing_by)).all()
    assert {r[0]: (r[1], r[2]) for r in rows} == {
        **{u: (StudyState.PROCESSING, "host-a:1") for u in first},
        **{u: (StudyState.PROCESSING, "host-b:2") for u in second},
    }
    # A queue this worker does not serve is left alone.
    with session_scope(factory) as s:
        assert claim_companions(s, ["another.queue"], settings.queues.urgent, 5, utcnow(), "host-d:4", -1) == []


def test_concurrent_claimers_share_nothing(backend, tmp_path, start_listener) -> None:
    settings, uids, _ = _queued_studies(backend, tmp_path, start_listener, 8)
    barrier, got, lock = threading.Barrier(4), [], threading.Lock()

    def claimer(i: int) -> None:
        factory = make_sessionmaker(make_engine(settings.database.url))  # its own engine, like another host
        barrier.wait()
        mine = _claims(factory, settings, 3, f"host-{i}:{i}")
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got))  # no study in two batches
    # A claimer that lost a race takes fewer, never a taken one; the rest is still there to claim.
    rest = _claims(make_sessionmaker(make_engine(settings.database.url)), settings, 8, "host-9:9")
    assert sorted(got + rest) == sorted(uids)


def test_a_message_for_a_study_in_a_live_batch_is_left_to_it(backend, tmp_path, start_listener) -> None:
    settings, uids, factory = _queued_studies(backend, tmp_path, start_listener, 2)
    assert _claims(factory, settings, 1, "host-a:1") == [uids[0]]
    with session_scope(factory) as s:
        s.add(WorkerHeartbeat(name="host-a:1", hostname="host-a", pid=1, queues="", last_seen_at=utcnow()))
    with session_scope(factory) as s:  # its own message reaches another worker: not scored twice
        assert begin_processing(s, uids[0], 1, utcnow(), "host-b:2").claim is Claim.ELSEWHERE
    with session_scope(factory) as s:  # the batch's worker then falls silent: the message resumes it
        s.execute(update(WorkerHeartbeat).values(last_seen_at=utcnow() - timedelta(minutes=5)))
    with session_scope(factory) as s:
        assert begin_processing(s, uids[0], 1, utcnow(), "host-b:2", dead_after_s=45).claim is Claim.STARTED
    with factory() as s:
        assert s.scalar(select(Study.processing_by).where(Study.study_uid == uids[0])) == "host-b:2"


def test_a_retried_task_takes_back_the_batch_it_left(backend, tmp_path, start_listener) -> None:
    settings, uids, factory = _queued_studies(backend, tmp_path, start_listener, 4)
    with session_scope(factory) as s:
        primary = begin_processing(s, uids[0], 1, utcnow(), "host-a:1")
    assert _claims(factory, settings, 2, "host-a:1", primary.study_id) == [uids[1], uids[2]]
    # The task failed transiently and is retried by the same process: its companions come first.
    assert _claims(factory, settings, 3, "host-a:1", primary.study_id) == [uids[1], uids[2], uids[3]]


def test_a_worker_drains_a_backlog_in_batches_exactly_once(tmp_path: Path) -> None:
    studies = 12
    with open_scoring_env("postgres", tmp_path, worker={"batch_studies": 5, "batch_size": 4}) as env:
        env.cleanup.pop()()  # stop the environment's worker: the backlog builds up first
        source = pydicom_data_file("RG1_UNCR.dcm")
        files = [as_new_study(source, tmp_path / "push" / f"{i:02d}.dcm") for i in range(studies)]
        uids = [study_uid_of(f) for f in files]
        env.push(files)
        wait_for(lambda: all(env.state_of(u) == StudyState.QUEUED for u in uids), timeout=120,
                 what="every study queued")  # fmt: skip
        worker = start_env_worker(env)
        for uid in uids:
            env.wait_final(uid)
        log = worker.log_path.read_text(errors="replace")
        with env.factory() as s:
            scored = Counter(
                uid
                for uid, to in s.execute(select(Study.study_uid, StateTransition.to_state).join(StateTransition))
                if to == StudyState.SCORED
            )
        assert all(env.state_of(u) == StudyState.SCORED for u in uids)
        assert scored == Counter({u: 1 for u in uids})
        for uid in uids:
            assert len(env.results(uid)) == 1
        assert "scored 5 studies in one batch" in log, log[-3000:]
        # Every companion's own message was acknowledged without work.
        wait_for(lambda: _acknowledged(worker.log_path) >= studies, timeout=120,
                 what="every message acknowledged")  # fmt: skip
        assert all(env.state_of(u) in FINAL for u in uids)


def _acknowledged(log_path: Path) -> int:
    """Tasks Celery reports finished (a scored batch, or a message acknowledged without work)."""
    return log_path.read_text(errors="replace").count(" succeeded in ")
