"""The worker's hard cases: the whole worker killed with -9 mid-task, and silent mode end to end.

Both tests share one listener and one worker per backend (tests/plugins/scoring.py), configured
with silent mode on and a short processing timeout, so the sweeper re-queues a study whose
worker died within seconds rather than half an hour.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.e2e.dx import dx_from_image
from db.models import Study, StudyState, utcnow
from tests.conftest import shared_file
from tests.plugins.scoring import ScoringEnv, open_scoring_env, start_env_worker, study_uid_of, wait_for
from tests.test_scoring import _candidates, _one_result_per_instance
from triage.policy import Level, worklist_order

PROCESSING_TIMEOUT_S = 10.0  # longer than a legitimate task here; a re-queue of a live one is harmless anyway


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def silent_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScoringEnv]:
    var = tmp_path_factory.mktemp(f"restart-{request.param}")
    with open_scoring_env(
        request.param,
        var,
        triage={"silent_mode": True},
        worker={"processing_timeout_s": PROCESSING_TIMEOUT_S},
    ) as env:
        yield env


def test_silent_mode_scores_and_records_but_keeps_arrival_order(silent_env: ScoringEnv, tmp_path: Path) -> None:
    env = silent_env
    normal, positive = (
        dx_from_image(p, tmp_path / f"{name}.dcm", rows=1024, columns=896)
        for name, p in (("normal", _candidates("NORMAL", 3)[0]), ("positive", _candidates("PNEUMONIA", 3)[0]))
    )
    env.push([normal])
    time.sleep(0.05)
    env.push([positive])
    uids = [study_uid_of(normal), study_uid_of(positive)]
    studies = [env.wait_final(u) for u in uids]
    assert all(s.state == StudyState.SCORED for s in studies)
    for s in studies:
        (result,) = _one_result_per_instance(env, s.study_uid, 1)
        assert result.outcome == "scored" and result.scores and result.model_ref == s.model_ref
        assert s.priority == Level.ROUTINE
        assert s.priority_reason.startswith("silent mode, model says ")
    flagged = env.results(uids[1])[0].flags["pneumonia"]
    assert flagged, "the Kermany pneumonia image was not flagged for pneumonia"
    assert studies[1].ai_priority < Level.ROUTINE  # the model's level is stored ...
    assert studies[0].received_at < studies[1].received_at
    with env.factory() as s:
        order = [u for u in s.scalars(select(Study.study_uid).order_by(*worklist_order(env.settings.triage, utcnow())))
                 if u in uids]  # fmt: skip
    assert order == uids  # ... but the worklist stays in arrival order


def test_whole_worker_killed_mid_task_then_restarted_scores_exactly_once(
    silent_env: ScoringEnv, tmp_path: Path
) -> None:
    env = silent_env
    assert env.worker is not None
    source = shared_file("kermany", "train", "NORMAL").iterdir().__next__()
    first = dx_from_image(source, tmp_path / "k0.dcm")
    uid = study_uid_of(first)
    files = [first] + [dx_from_image(source, tmp_path / f"k{i}.dcm", study_uid=uid) for i in range(1, 12)]
    env.push(files)
    wait_for(lambda: env.state_of(uid) == StudyState.PROCESSING, timeout=240, interval=0.02, what="the task to start")
    env.worker.kill_all()  # main process and pool children: nobody is left to report the lost task
    killed_while = env.state_of(uid)
    assert killed_while == StudyState.PROCESSING
    env.worker = start_env_worker(env)  # a fresh worker, as after a reboot
    study = env.wait_final(uid)
    assert study.state == StudyState.SCORED
    _one_result_per_instance(env, uid, len(files))
    assert study.handoff_generation >= 2  # scored from the sweeper's re-queue
    assert "re-queued by the sweeper: processing" in " ".join(str(r) for r in env.transition_reasons(uid))
