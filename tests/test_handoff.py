"""Hand-off to Celery and the worker task, on both backends with the real brokers.

The promises: a study is queued once per stable state, never lost (a failed publish or a
restart leaves it to be found again), routed by requested priority, and a worker carries a
current message to a final state while ignoring stale ones.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pydicom
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import StateTransition, Study, StudyState, utcnow
from db.session import make_engine, make_sessionmaker, session_scope
from tests.conftest import REPO, pydicom_data_file, shared_file
from tests.plugins.ingest import pynetdicom_store, real_files, storescu, wait_for
from worker.handoff import Handoff, scan_once
from worker.tasks import Claim, begin_processing, finish_study


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[Handoff] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, handoff: Handoff) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        with self.lock:
            self.sent.append(handoff)


def _factory(url: str):
    return make_sessionmaker(make_engine(url))


def _released(url: str, study_uid: str) -> Study:
    """The study once the listener has recorded its A-RELEASE: storescu may exit before the
    listener's release handler has committed it."""

    def recorded() -> Study | None:
        study = _study(url, study_uid)
        return study if study.released_at is not None and study.released_at >= study.last_instance_at else None

    found: Study = wait_for(recorded, timeout=30, what="the release to be recorded")
    return found


def _study(url: str, study_uid: str) -> Study:
    with _factory(url)() as s:
        return s.scalars(select(Study).where(Study.study_uid == study_uid)).one()


def _transitions(url: str, study_uid: str) -> list[tuple[str | None, str, str | None]]:
    with _factory(url)() as s:
        rows = s.execute(
            select(StateTransition.from_state, StateTransition.to_state, StateTransition.reason)
            .join(Study)
            .where(Study.study_uid == study_uid)
            .order_by(StateTransition.id)
        ).all()
    return [tuple(r) for r in rows]


def _uid(path: Path, keyword: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get(keyword))


def _another_instance(source: Path, out: Path) -> Path:
    """The same study, a new SOP Instance UID (a further image of it)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def _push_and_abort(port: int, path: Path) -> None:
    """Send one file, then abort the association: the sender never says it is done."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    status = pynetdicom_store(port, path, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, abort=True)
    assert status.Status == 0x0000


def test_quiet_study_is_claimed_once_and_reopened_by_a_late_instance(backend, tmp_path, start_listener):
    """Associations that end in an abort: the stability window decides."""
    settings = backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    first, later = pydicom_data_file("RG1_UNCR.dcm"), pydicom_data_file("RG1_J2KR.dcm")
    study_uid = _uid(first)
    _push_and_abort(handle.port, first)
    factory, window, queues = _factory(settings.database.url), 5.0, settings.queues
    received = _study(settings.database.url, study_uid).last_instance_at
    assert _study(settings.database.url, study_uid).released_at is None
    recorder = Recorder()

    assert scan_once(factory, recorder, window, queues, now=received + timedelta(seconds=4.9)) == []
    done = scan_once(factory, recorder, window, queues, now=received + timedelta(seconds=5))
    assert done == [Handoff(study_uid, 1, queues.routine)]
    assert scan_once(factory, recorder, window, queues, now=received + timedelta(seconds=60)) == []

    _push_and_abort(handle.port, later)
    study = _study(settings.database.url, study_uid)
    assert study.state == StudyState.RECEIVING and study.handoff_generation == 1
    assert scan_once(factory, recorder, window, queues, now=study.last_instance_at + timedelta(seconds=1)) == []
    again = scan_once(factory, recorder, window, queues, now=study.last_instance_at + timedelta(seconds=5))
    assert again == [Handoff(study_uid, 2, queues.routine)]
    assert recorder.sent == [*done, *again]
    assert _transitions(settings.database.url, study_uid) == [
        (None, "receiving", None),
        ("receiving", "queued", None),
        ("queued", "receiving", "new instance arrived while queued"),
        ("receiving", "queued", None),
    ]


def test_a_released_association_hands_its_study_off_after_the_grace(backend, tmp_path, start_listener):
    """One association, released: due `release_grace_s` after the release, not after the window."""
    settings = backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    first = pydicom_data_file("RG1_UNCR.dcm")
    study_uid = _uid(first)
    assert storescu(handle.port, [first, _another_instance(first, tmp_path / "a1.dcm")]).returncode == 0
    study = _released(settings.database.url, study_uid)
    factory, window, grace, queues = _factory(settings.database.url), 60.0, 0.5, settings.queues
    recorder = Recorder()

    def scan(at: timedelta) -> list[Handoff]:
        return scan_once(factory, recorder, window, queues, now=study.released_at + at, grace_s=grace)

    assert scan(timedelta(seconds=0.4)) == []
    assert scan(timedelta(seconds=0.5)) == [Handoff(study_uid, 1, queues.routine)]

    # A second association for the same study: the release of the first no longer counts (an
    # instance arrived after it) until this one is released too; aborted, the window decides.
    _push_and_abort(handle.port, _another_instance(first, tmp_path / "a2.dcm"))
    reopened = _study(settings.database.url, study_uid)
    assert reopened.state == StudyState.RECEIVING and reopened.released_at < reopened.last_instance_at
    assert scan_once(factory, recorder, window, queues, now=reopened.last_instance_at + timedelta(seconds=5),
                     grace_s=grace) == []  # fmt: skip
    assert storescu(handle.port, [_another_instance(first, tmp_path / "a3.dcm")]).returncode == 0
    released = _released(settings.database.url, study_uid)
    later = scan_once(factory, recorder, window, queues, now=released.released_at + timedelta(seconds=0.5),
                      grace_s=grace)  # fmt: skip
    assert later == [Handoff(study_uid, 2, queues.routine)]


def test_the_listener_wakes_the_hand_off_at_a_release(backend, tmp_path, start_listener):
    """The running hand-off, with the stability window far away: a DCMTK push that ends in
    A-RELEASE is queued once its grace has passed; one that ends in an abort waits the window."""
    window = 8.0
    settings = backend.settings(tmp_path, handoff={"stability_window_s": window, "release_grace_s": 0.5,
                                                   "poll_interval_s": 5.0})  # fmt: skip
    handle = start_listener(settings)
    released_file = pydicom_data_file("RG1_UNCR.dcm")
    aborted_file = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
    assert storescu(handle.port, [released_file]).returncode == 0
    _push_and_abort(handle.port, aborted_file)
    url = settings.database.url
    released = wait_for(lambda: (s := _study(url, _uid(released_file))).queued_at and s, timeout=120,
                        what="the released study to be queued")  # fmt: skip
    # Queued by the release: after its grace, before the window (or a 5 s poll) could have done it.
    assert released.released_at + timedelta(seconds=0.5) <= released.queued_at
    assert released.queued_at < released.last_instance_at + timedelta(seconds=window)
    aborted = wait_for(lambda: (s := _study(url, _uid(aborted_file))).queued_at and s, timeout=120,
                       what="the aborted study to be queued")  # fmt: skip
    assert aborted.released_at is None
    assert aborted.queued_at >= aborted.last_instance_at + timedelta(seconds=window)


def test_failed_publish_rolls_back_and_is_retried(backend, tmp_path, start_listener):
    settings = backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    path = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
    assert storescu(handle.port, [path]).returncode == 0
    factory, later = _factory(settings.database.url), utcnow() + timedelta(hours=1)
    assert scan_once(factory, Recorder(fail=True), 5.0, settings.queues, now=later) == []
    study = _study(settings.database.url, _uid(path))
    assert (study.state, study.handoff_generation, study.queued_at) == (StudyState.RECEIVING, 0, None)
    recorder = Recorder()
    assert [h.generation for h in scan_once(factory, recorder, 5.0, settings.queues, now=later)] == [1]
    assert _study(settings.database.url, _uid(path)).state == StudyState.QUEUED


def test_concurrent_scanners_hand_off_each_study_exactly_once(backend, tmp_path, start_listener):
    settings = backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    files = real_files()
    for path in files:
        assert storescu(handle.port, [path]).returncode == 0
    studies = {_uid(p) for p in files}
    recorder, barrier, later = Recorder(), threading.Barrier(4), utcnow() + timedelta(hours=1)

    def scanner() -> None:
        factory = _factory(settings.database.url)  # its own engine, like another process
        barrier.wait()
        scan_once(factory, recorder, 5.0, settings.queues, now=later)

    threads = [threading.Thread(target=scanner) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(h.study_uid for h in recorder.sent) == sorted(studies)


def test_restart_between_receipt_and_handoff_loses_nothing(backend, tmp_path, start_listener):
    settings = backend.settings(tmp_path, handoff={"stability_window_s": 2.0, "poll_interval_s": 0.1})
    first = start_listener(settings)
    path = shared_file("dicom", "dx_for_presentation_animal_lateral.dcm")
    assert storescu(first.port, [path]).returncode == 0
    first.stop()  # well inside the stability window
    assert backend.queued() == []
    assert _study(settings.database.url, _uid(path)).state == StudyState.RECEIVING
    start_listener(settings)
    queued = wait_for(backend.queued, what="the pending study to be found after restart")
    assert [(q.study_uid, q.generation) for q in queued] == [(_uid(path), 1)]


def test_requested_priority_routes_to_the_urgent_queue(backend, tmp_path, start_listener):
    settings = backend.settings(tmp_path)
    handle = start_listener(settings)
    routine = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
    ds = pydicom.dcmread(routine)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.RequestedProcedurePriority = "STAT"
    stat = tmp_path / "stat.dcm"
    ds.save_as(stat)
    assert storescu(handle.port, [routine, stat]).returncode == 0
    queued = wait_for(lambda: len(backend.queued()) == 2 and backend.queued(), what="both studies queued")
    assert {(q.study_uid, q.queue) for q in queued} == {
        (_uid(routine), backend.routine),
        (str(ds.StudyInstanceUID), backend.urgent),
    }


def test_worker_claims_current_messages_and_ignores_stale_ones(sqlite_backend, tmp_path, start_listener):
    settings = sqlite_backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    path = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
    assert storescu(handle.port, [path]).returncode == 0
    factory, uid = _factory(settings.database.url), _uid(path)
    scan_once(factory, Recorder(), 5.0, settings.queues, now=utcnow() + timedelta(hours=1))
    with session_scope(factory) as s:
        assert begin_processing(s, uid, 2, utcnow()).claim is Claim.NOT_YET  # commit not visible yet
        assert begin_processing(s, uid, 0, utcnow()).claim is Claim.STALE
        assert begin_processing(s, "1.2.3.4", 1, utcnow()).claim is Claim.STALE
        started = begin_processing(s, uid, 1, utcnow())
        assert started.claim is Claim.STARTED
        # A redelivery after a worker died resumes; it does not record a second transition.
        assert begin_processing(s, uid, 1, utcnow()).claim is Claim.STARTED
        assert finish_study(s, started.study_id, 1, StudyState.FAILED, "x", utcnow())
        assert not finish_study(s, started.study_id, 1, StudyState.FAILED, "x", utcnow())
    assert [t[1] for t in _transitions(settings.database.url, uid)] == ["receiving", "queued", "processing", "failed"]


def test_real_worker_carries_a_pushed_study_to_its_final_state(backend, tmp_path, start_listener):
    settings = backend.settings(tmp_path, worker={"heatmap_dir": str(tmp_path / "heatmaps")})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    worker = subprocess.Popen(
        [sys.executable, "-m", "xray_triage.cli", "--config", str(config), "worker", "--concurrency", "1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        handle = start_listener(settings)
        path = pydicom_data_file("RG1_J2KI.dcm")
        assert storescu(handle.port, [path]).returncode == 0
        uid = _uid(path)
        wait_for(lambda: _study(settings.database.url, uid).state == StudyState.SCORED, timeout=240,
                 what="the worker to finish the study")  # fmt: skip
        study = _study(settings.database.url, uid)
        assert study.priority is not None and study.model_ref
        assert study.processing_at is not None and study.finished_at is not None
        assert [t[1] for t in _transitions(settings.database.url, uid)] == [
            "receiving", "queued", "processing", "scored"
        ]  # fmt: skip
        wait_for(lambda: backend.queued() == [], what="the message to be acknowledged")
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
