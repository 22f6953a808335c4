"""From a DICOM push to a prioritised, explained score, with the real worker and the real model.

One listener and one Celery worker per backend serve the whole module (tests/plugins/scoring.py):
SQLite + the embedded broker, and PostgreSQL + Redis with the worker's database connection
running through a proxy that one test cuts.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from bench.e2e.dx import dx_from_image
from db.models import InstanceResult, Study, StudyState, utcnow
from dicom_io.pixels import PIPELINE_VERSION
from models.findings import FINDING_NAMES
from tests.conftest import pydicom_data_file, shared_file
from tests.plugins.scoring import ScoringEnv, as_new_study, study_uid_of, wait_for
from worker.triage import AI_UNAVAILABLE, Level, worklist_order


def _one_result_per_instance(env: ScoringEnv, uid: str, n: int) -> list[InstanceResult]:
    results = env.results(uid)
    assert len(results) == n
    assert len({(r.instance_id, r.model_ref) for r in results}) == n
    return results


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
        assert result.received_at <= result.started_at <= result.finished_at
        assert result.queued_at is not None and result.queued_at <= result.started_at
        flagged = {f for f, on in result.flags.items() if on}
        assert flagged == {f for f, s in result.scores.items() if s >= result.thresholds[f]}
        assert set(result.heatmaps) == flagged
        for path in result.heatmaps.values():
            assert Path(path).read_bytes().startswith(b"\x89PNG")
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
        (result,) = _one_result_per_instance(env, study.study_uid, 1)
        assert result.outcome == "ineligible" and result.scores is None

    study = env.wait_final(study_uid_of(corrupt))
    assert study.state == StudyState.FAILED
    assert "TruncatedPixelData" in (study.state_reason or "")
    assert (study.ai_state, study.priority) == (AI_UNAVAILABLE, Level.ROUTINE)
    assert env.worker is not None and env.worker.proc.poll() is None  # the worker survived


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
    first = dx_from_image(source, tmp_path / "s0.dcm")
    uid = study_uid_of(first)
    files = [first] + [dx_from_image(source, tmp_path / f"s{i}.dcm", study_uid=uid) for i in range(1, 12)]
    env.push(files)
    wait_for(lambda: env.state_of(uid) == StudyState.PROCESSING, timeout=240, interval=0.02, what="the task to start")
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
