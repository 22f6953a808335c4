"""Errors that retrying cannot fix end the study `failed`, on the worklist, read as usual.

The task runs in this process (``Task.apply``) against the real database; a missing model
fails before TensorFlow is imported, so no worker process is needed.
"""

from __future__ import annotations

from datetime import timedelta

from broker import make_celery
from db.models import StudyState, utcnow
from db.session import make_engine, make_sessionmaker
from tests.conftest import pydicom_data_file
from tests.plugins.ingest import storescu
from tests.plugins.scoring import ScoringEnv, as_new_study, scoring_settings, study_uid_of
from triage.policy import AI_UNAVAILABLE, Level
from worker.handoff import Handoff, scan_once
from worker.tasks import backoff_s, register_tasks


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 0.5, 4.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_s(10_000, 1.0, 60.0) == 60.0


def test_missing_model_fails_the_study_instead_of_leaving_it_processing(sqlite_backend, tmp_path, start_listener):
    settings = scoring_settings(
        sqlite_backend.database_url, sqlite_backend.broker_url, tmp_path, "errors",
        model={"path": str(tmp_path / "no-such-model")},
    )  # fmt: skip
    handle = start_listener(settings, with_handoff=False)
    path = as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "a.dcm")
    assert storescu(handle.port, [path]).returncode == 0
    sent: list[Handoff] = []
    scan_once(make_sessionmaker(make_engine(settings.database.url)), sent.append, 0.5, settings.queues,
              now=utcnow() + timedelta(hours=1))  # fmt: skip
    (handoff,) = sent
    task = register_tasks(make_celery(settings), settings)
    assert task.apply(args=[handoff.study_uid, handoff.generation]).get() == "failed"
    env = ScoringEnv("errors", settings, tmp_path)
    study = env.study(study_uid_of(path))
    assert study.state == StudyState.FAILED
    assert study.state_reason.startswith("AI error: FileNotFoundError: model not found")
    assert (study.ai_state, study.priority) == (AI_UNAVAILABLE, Level.ROUTINE)
    assert env.states(study.study_uid) == ["receiving", "queued", "processing", "failed"]
    # A redelivery of the same message finds the study final and does nothing.
    assert task.apply(args=[handoff.study_uid, handoff.generation]).get() == "stale"
