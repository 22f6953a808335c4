"""From a DICOM push to a prioritised, explained score, with the real worker and the real model.

One listener and one Celery worker per backend serve the whole module (tests/plugins/scoring.py):
SQLite + the embedded broker, and PostgreSQL + Redis with the worker's database connection
running through a proxy that one test cuts.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select, update

from bench.e2e.dx import dx_from_image
from db.heartbeats import read_heartbeats
from db.models import InstanceResult, Study, StudyState, utcnow
from dicom_io.pixels import PIPELINE_VERSION
from models.card import ModelCard
from models.findings import FINDING_NAMES
from models.registry import resolve_model_path
from settings import Settings
from tests.conftest import pydicom_data_file, shared_file
from tests.plugins.scoring import ScoringEnv, as_new_study, study_uid_of, wait_for
from triage.operating import card_steering
from triage.policy import AI_UNAVAILABLE, Level, worklist_order


def _one_result_per_instance(env: ScoringEnv, uid: str, n: int) -> list[InstanceResult]:
    results = env.results(uid)
    assert len(results) == n
    assert len({(r.instance_id, r.model_ref) for r in results}) == n
    return results


def _expected_flagged_findings(results: list[InstanceResult]) -> str | None:
    """``,f1,f2,`` from the per-instance flags stored with the results (None when none is flagged)."""
    flagged = {f for r in results if r.flags for f, on in r.flags.items() if on}
    return f",{','.join(f for f in FINDING_NAMES if f in flagged)}," if flagged else None


def _assert_study_opinion(study: Study, results: list[InstanceResult]) -> None:
    """The worklist's top finding and finding filter agree with the stored instance results."""
    assert study.flagged_findings == _expected_flagged_findings(results)
    (result,) = results  # one instance: it is the one that set the level
    # Only findings allowed to steer the priority can be the top finding (the card's operating
    # points and within-collection evidence decide which: triage.policy.steering_findings).
    card = ModelCard.load(resolve_model_path().parent / "card.json")
    steering = card_steering(card, Settings(), result.operating_point or "adult")
    if not steering:  # nothing may steer at this operating point: no top finding to show
        assert study.top_finding is None
        assert "informational" in study.priority_reason or not study.flagged_findings
        return
    top = min(steering, key=lambda f: result.thresholds[f] - result.scores[f])
    assert study.top_finding == top
    assert study.top_score == pytest.approx(result.scores[top])
    assert f"{top} {result.scores[top]:.2f}" in study.priority_reason


def _pool_heartbeats(env: ScoringEnv) -> list[dict]:
    assert env.worker is not None
    pids = set(env.worker.pool_children())
    with env.factory() as s:
        rows = read_heartbeats(s, utcnow(), stale_after_s=4 * env.settings.worker.heartbeat_interval_s)
    return [r for r in rows if r["pid"] in pids and r["hostname"] == socket.gethostname()]


def test_real_images_end_scored_ineligible_or_failed(scoring_env: ScoringEnv, tmp_path: Path) -> None:
    env = scoring_env
    chests = [
        shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm"),
        shared_file("dicom", "nema_cr_mono1_10bit_chest_no_meta.dcm"),
        pydicom_data_file("RG1_UNCR.dcm"),
    ]
    leg = pydicom_data_file("RG3_UNCR.dcm")
    animal = shared_file("dicom", "dx_for_presentation_animal_lateral.dcm")
    # Structurally complete (the listener accepts it) but the frame is twice as tall as its data.
    nema = pydicom_data_file("RG1_UNCR.dcm")
    corrupt = as_new_study(nema, tmp_path / "corrupt.dcm", Rows=2 * 1955)
    for f in [*chests, leg, animal, corrupt]:
        env.push([f])

    flagged_any = False
    for f in chests:
        uid = study_uid_of(f)
        study = env.wait_final(uid)
        assert study.state == StudyState.SCORED, study.state_reason
        assert study.priority in (Level.CRITICAL, Level.URGENT, Level.ROUTINE)
        assert study.priority == study.ai_priority
        assert study.priority_reason and study.model_ref and study.ai_state is None
        (result,) = _one_result_per_instance(env, uid, 1)
        assert result.outcome == "scored" and result.model_ref == study.model_ref
        assert set(result.scores) == set(FINDING_NAMES) and set(result.thresholds) == set(FINDING_NAMES)
        assert result.pipeline_version == PIPELINE_VERSION
        assert result.operating_point == "adult"  # no age in these headers (or an adult one)
        assert result.received_at <= result.started_at <= result.finished_at
        assert result.queued_at is not None and result.queued_at <= result.started_at
        flagged = {f for f, on in result.flags.items() if on}
        assert flagged == {f for f, s in result.scores.items() if s >= result.thresholds[f]}
        assert set(result.heatmaps) == flagged
        for path in result.heatmaps.values():
            with Image.open(path) as im:  # the map alone, for the viewer to overlay at any opacity
                assert (im.format, im.mode, im.size) == ("PNG", "RGBA", (224, 224))
        _assert_study_opinion(study, [result])
        flagged_any |= bool(flagged)
        assert env.states(uid) == ["receiving", "queued", "processing", "scored"]
        if flagged:
            finding = max(flagged, key=lambda x: result.scores[x] - result.thresholds[x])
            assert f"{finding} {result.scores[finding]:.2f} ≥ {result.thresholds[finding]:.2f}" in study.priority_reason
    assert flagged_any, "the adult chest with masses (RG1) should raise at least one finding"

    for f, words in ((leg, "body part EXTREMITY"), (animal, "non-human")):
        study = env.wait_final(study_uid_of(f))
        assert study.state == StudyState.INELIGIBLE
        assert words in (study.state_reason or "")
        assert (study.ai_state, study.priority) == (AI_UNAVAILABLE, Level.ROUTINE)
        assert study.priority_reason.startswith(AI_UNAVAILABLE)
        assert (study.top_finding, study.top_score, study.flagged_findings) == (None, None, None)
        (result,) = _one_result_per_instance(env, study.study_uid, 1)
        assert result.outcome == "ineligible" and result.scores is None

    study = env.wait_final(study_uid_of(corrupt))
    assert study.state == StudyState.FAILED
    assert "TruncatedPixelData" in (study.state_reason or "")
    assert (study.ai_state, study.priority) == (AI_UNAVAILABLE, Level.ROUTINE)
    assert (study.top_finding, study.top_score, study.flagged_findings) == (None, None, None)
    assert env.worker is not None and env.worker.proc.poll() is None  # the worker survived

    # Each pool process keeps a heartbeat row naming its queues and model.
    (heartbeat,) = wait_for(lambda: _pool_heartbeats(env), what="the pool process's heartbeat row")
    assert heartbeat["name"] == f"{socket.gethostname()}:{heartbeat['pid']}"
    assert set(heartbeat["queues"].split(",")) == {env.settings.queues.urgent, env.settings.queues.routine}
    assert heartbeat["model_ref"] == study.model_ref and heartbeat["alive"]

    # The six studies above were counted in the process and written by a later beat.
    def counted() -> list[dict]:
        return [h for h in _pool_heartbeats(env) if h["tasks_done"] >= 6]

    wait_for(counted, timeout=4 * env.settings.worker.heartbeat_interval_s, what="the studies done in the heartbeat")


def _candidates(folder: str, n: int) -> list[Path]:
    files = sorted(shared_file("kermany", "train", folder).iterdir())
    return files[:: max(1, len(files) // n)][:n]


def test_positive_study_received_later_is_read_first_and_old_studies_escalate(
    scoring_env: ScoringEnv, tmp_path: Path
) -> None:
    env = scoring_env
    normals = [
        dx_from_image(p, tmp_path / f"n{i}.dcm", rows=1024, columns=896) for i, p in enumerate(_candidates("NORMAL", 3))
    ]
    positives = [
        dx_from_image(p, tmp_path / f"p{i}.dcm", rows=1024, columns=896)
        for i, p in enumerate(_candidates("PNEUMONIA", 3))
    ]
    for f in normals:
        env.push([f])
    time.sleep(0.05)
    for f in positives:
        env.push([f])
    normal_uids = [study_uid_of(f) for f in normals]
    positive_uids = [study_uid_of(f) for f in positives]
    studies = {uid: env.wait_final(uid) for uid in normal_uids + positive_uids}
    assert all(s.state == StudyState.SCORED for s in studies.values())

    def pneumonia_flag(uid: str) -> bool:
        (r,) = env.results(uid)
        return bool(r.flags["pneumonia"])

    positive = next((u for u in positive_uids if pneumonia_flag(u)), None)
    normal = max((u for u in normal_uids), key=lambda u: studies[u].priority)
    assert positive is not None, "no Kermany pneumonia image was flagged for pneumonia"
    assert studies[positive].priority < studies[normal].priority, "the model ranks a normal as high as a positive"
    assert studies[normal].received_at < studies[positive].received_at

    mine = [*normal_uids, *positive_uids]
    now = utcnow()
    with env.factory() as s:
        order = [
            u
            for u in s.scalars(select(Study.study_uid).order_by(*worklist_order(env.settings.triage, now)))
            if u in mine
        ]
    assert order.index(positive) < order.index(normal)

    # The normal study waits past its level's cap (4 h for routine): it rises one level, above
    # every study of that level that waited less.
    old, level = normal, studies[normal].priority
    with env.factory.begin() as s:
        s.execute(update(Study).where(Study.study_uid == old).values(received_at=now - timedelta(hours=5)))
    with env.factory() as s:
        ordered = s.scalars(select(Study.study_uid).order_by(*worklist_order(env.settings.triage, utcnow())))
        order = [u for u in ordered if u in mine]
    peers = [u for u in mine if u != old and studies[u].priority >= level - 1]
    assert all(order.index(old) < order.index(u) for u in peers)


def test_worker_killed_mid_task_scores_the_study_exactly_once(scoring_env: ScoringEnv, tmp_path: Path) -> None:
    env = scoring_env
    assert env.worker is not None
    source = shared_file("kermany", "train", "NORMAL").iterdir().__next__()
    # The kill must land while the task runs: on a loaded machine this poll can miss a short
    # task, so a study scored before it was seen processing is followed by a longer one.
    for attempt in range(3):
        first = dx_from_image(source, tmp_path / f"a{attempt}-s0.dcm")
        uid = study_uid_of(first)
        n = 12 * 2**attempt
        files = [first] + [dx_from_image(source, tmp_path / f"a{attempt}-s{i}.dcm", study_uid=uid) for i in range(1, n)]
        env.push(files)
        seen = wait_for(
            lambda uid=uid: (state := env.state_of(uid)) in (StudyState.PROCESSING, StudyState.SCORED) and state,
            timeout=240,
            interval=0.02,
            what="the task to start",
        )
        if seen == StudyState.PROCESSING:
            break
    else:
        pytest.fail("three studies were scored before their task was seen running")
    children = env.worker.pool_children()
    assert children, "no pool process to kill"
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    killed_while = env.state_of(uid)
    study = env.wait_final(uid)
    assert killed_while == StudyState.PROCESSING
    assert study.state == StudyState.SCORED
    _one_result_per_instance(env, uid, len(files))
    wait_for(lambda: "WorkerLostError" in env.worker.output() or "signal 9" in env.worker.output(),
             what="the worker to report the lost task")  # fmt: skip
    assert env.worker.proc.poll() is None


@pytest.mark.parametrize("scoring_env", ["postgres"], indirect=True)  # a server we can cut; reuses its worker
def test_database_outage_during_a_task_is_retried_then_succeeds(scoring_env: ScoringEnv, tmp_path: Path) -> None:
    env = scoring_env
    assert env.proxy is not None and env.worker is not None
    path = as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "outage.dcm")
    uid = study_uid_of(path)
    env.proxy.cut()  # the worker loses PostgreSQL; the listener (direct connection) does not
    try:
        env.push([path])
        wait_for(lambda: f"study {uid} generation 1: OperationalError, retry 2" in env.worker.output(),
                 timeout=120, what="the worker to retry")  # fmt: skip
    finally:
        env.proxy.open()
    study = env.wait_final(uid)
    assert study.state == StudyState.SCORED
    _one_result_per_instance(env, uid, 1)
