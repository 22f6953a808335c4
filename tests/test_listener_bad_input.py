"""Hostile, broken and unlucky input: every case gets a clear refusal and the listener keeps serving.

Never success-and-lose: a refused instance leaves no file and no row behind, a database
outage turns into a failure status the sender retries, and a retry after recovery succeeds.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from sqlalchemy import func, select

from db.models import Instance, Study
from db.session import make_engine
from dicom_io.listener import DATABASE_UNAVAILABLE, INVALID_UID, MALFORMED_DATASET, OUT_OF_RESOURCES
from tests.conftest import pydicom_data_file, shared_file
from tests.plugins.ingest import (
    PG_HOST,
    PG_PORT,
    TcpProxy,
    dimse_statuses,
    echoscu,
    pynetdicom_store,
    real_files,
    storescu,
    wait_for,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT = "1.2.840.10008.1.2.1"
BASELINE = "1.2.840.10008.1.2.4.50"


def _count(url: str, model: type) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        engine.dispose()


def _study_state(url: str) -> tuple[str, int] | None:
    """(state, hand-off generation) of the only study in the database."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(Study.state, Study.handoff_generation)).one_or_none()
            return (str(row[0]), int(row[1])) if row else None
    finally:
        engine.dispose()


def _spooled_files(spool: Path) -> list[Path]:
    return [p for p in spool.rglob("*") if p.is_file()]


def _status_in(stderr: str) -> int | None:
    statuses = dimse_statuses(stderr)
    return statuses[-1] if statuses else None


def test_disallowed_calling_ae_is_rejected_and_logged(sqlite_backend, tmp_path, start_listener, log_text):
    settings = sqlite_backend.settings(
        tmp_path,
        listener={"allowed_callers": [{"ae_title": "GOODSCU"}, {"ae_title": "PINNED", "host": "10.20.30.40"}]},
    )
    handle = start_listener(settings, with_handoff=False)
    rejected = echoscu(handle.port, aet="EVILSCU")
    assert rejected.returncode != 0
    assert "Association Rejected" in rejected.stderr
    assert "Calling AE Title Not Recognized" in rejected.stderr
    assert re.search(r"rejected: calling AE 'EVILSCU' from 127\.0\.0\.1", log_text())
    # An allowed title pinned to another host is refused too.
    assert "Association Rejected" in echoscu(handle.port, aet="PINNED").stderr
    assert "'PINNED' from 127.0.0.1" in log_text()
    # The listener keeps serving the callers it knows.
    ok = echoscu(handle.port, aet="GOODSCU")
    assert ok.returncode == 0, ok.stderr


def test_wrong_called_ae_is_rejected(sqlite_backend, tmp_path, start_listener):
    handle = start_listener(sqlite_backend.settings(tmp_path), with_handoff=False)
    result = echoscu(handle.port, aec="SOMEONE_ELSE")
    assert result.returncode != 0 and "Association Rejected" in result.stderr


def test_unsupported_sop_class_is_rejected_per_presentation_context(sqlite_backend, tmp_path, start_listener):
    handle = start_listener(sqlite_backend.settings(tmp_path), with_handoff=False)
    ct_image = "1.2.840.10008.5.1.4.1.1.2"
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ct_image, EXPLICIT)
    ae.add_requested_context(CR, EXPLICIT)
    assoc = ae.associate("127.0.0.1", handle.port, ae_title="XRAY_TRIAGE")
    try:
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [ct_image]
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CR]
    finally:
        assoc.release()
    # DCMTK with a real CT image: no accepted context, store fails, listener unaffected.
    result = storescu(handle.port, [Path(get_testdata_file("CT_small.dcm"))])
    assert result.returncode != 0
    assert echoscu(handle.port).returncode == 0


def _hostile_copy(source: Path, out: Path, **attributes: str) -> Path:
    ds = pydicom.dcmread(source)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    ds.save_as(out)
    return out


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    "attributes",
    [
        {"StudyInstanceUID": "../../x"},
        {"SeriesInstanceUID": "1.2.3/../../../../tmp/evil"},
        {"StudyInstanceUID": "1." + "2" * 70},
        {"SOPInstanceUID": "../../../evil"},
    ],
    ids=["study-dotdot", "series-slash", "too-long", "sop-dotdot"],
)
def test_hostile_uids_are_refused_and_write_nothing(sqlite_backend, tmp_path, start_listener, attributes):
    settings = sqlite_backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    siim = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
    (tmp_path / "in").mkdir()
    hostile = _hostile_copy(siim, tmp_path / "in" / "hostile.dcm", **attributes)
    before = {p for p in tmp_path.parent.rglob("*")}
    status = pynetdicom_store(handle.port, hostile, SC, BASELINE)
    assert status.Status == INVALID_UID
    assert "not a valid" in status.ErrorComment or "invalid UID" in status.ErrorComment
    result = storescu(handle.port, [hostile])
    assert result.returncode != 0 and _status_in(result.stderr) == INVALID_UID, result.stderr
    spool = Path(settings.storage.spool_dir)
    assert _spooled_files(spool) == []
    assert {p for p in tmp_path.parent.rglob("*")} - before == set()
    assert not Path("/tmp/evil").exists() and not (tmp_path.parent / "x").exists()
    assert _count(settings.database.url, Instance) == 0
    good = storescu(handle.port, [siim])
    assert good.returncode == 0, good.stderr
    assert _count(settings.database.url, Instance) == 1


def test_truncated_and_garbage_datasets_fail_and_listener_keeps_serving(sqlite_backend, tmp_path, start_listener):
    settings = sqlite_backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    uncr = pydicom_data_file("RG1_UNCR.dcm")
    data = uncr.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) // 2])
    head_cut = tmp_path / "header_cut.dcm"
    head_cut.write_bytes(data[:1500])
    # A valid file meta header followed by a real PNG's bytes where the dataset should be.
    meta_len = 144 + int.from_bytes(data[140:144], "little")
    garbage = tmp_path / "garbage.dcm"
    png = next(shared_file("nih-findings", "images").glob("*.png"))
    garbage.write_bytes(data[:meta_len] + png.read_bytes())

    for bad in (truncated, head_cut, garbage):
        status = pynetdicom_store(handle.port, bad, CR, EXPLICIT)
        assert status.Status == MALFORMED_DATASET, (bad.name, hex(status.Status))
        good = storescu(handle.port, [shared_file("dicom", "dx_for_presentation_animal_lateral.dcm")])
        assert good.returncode == 0, good.stderr
    spool = Path(settings.storage.spool_dir)
    assert len(_spooled_files(spool)) == 1  # the good one, stored once; nothing left in staging
    assert _count(settings.database.url, Instance) == 1
    # The whole, untruncated file still goes through afterwards.
    assert pynetdicom_store(handle.port, uncr, CR, EXPLICIT).Status == 0x0000


def test_duplicates_are_stored_and_queued_once_conflicts_are_versioned(backend, tmp_path, start_listener):
    settings = backend.settings(tmp_path)
    handle = start_listener(settings)
    uncr = pydicom_data_file("RG1_UNCR.dcm")
    for _ in range(2):
        result = storescu(handle.port, [uncr, uncr])
        assert result.returncode == 0, result.stderr
    assert _count(settings.database.url, Instance) == 1
    spool = Path(settings.storage.spool_dir)
    assert len(_spooled_files(spool)) == 1
    wait_for(lambda: len(backend.queued()) == 1, what="the study to be queued")
    # Pushing the same bytes again after hand-off neither stores nor re-queues anything.
    assert storescu(handle.port, [uncr]).returncode == 0
    time.sleep(3 * settings.handoff.stability_window_s)
    assert len(backend.queued()) == 1
    # Same SOP Instance UID, different bytes: both kept, the new one a flagged version.
    for name in ("RG1_UNCI.dcm", "RG1_J2KI.dcm"):
        assert storescu(handle.port, [pydicom_data_file(name)]).returncode == 0
    assert len(_spooled_files(spool)) == 3
    engine = make_engine(settings.database.url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(Instance.version, Instance.conflicting_version).where(
                Instance.sop_instance_uid == pydicom.dcmread(pydicom_data_file("RG1_J2KI.dcm")).SOPInstanceUID
            )
        ).all()
    engine.dispose()
    assert sorted(rows) == [(1, False), (2, True)]
    # The new instances re-opened the study: it is queued again, once per stable state (two
    # separate storescu runs may or may not fall within one stability window).
    wait_for(lambda: _study_state(settings.database.url) == ("queued", len(backend.queued())),
             what="the re-opened study to be queued again")  # fmt: skip
    generations = sorted(q.generation for q in backend.queued())
    assert generations[0] == 1 and generations == list(range(1, len(generations) + 1)) and len(generations) >= 2


def test_disk_below_reserve_answers_out_of_resources(sqlite_backend, tmp_path, start_listener):
    settings = sqlite_backend.settings(tmp_path, storage={"min_free_mb": 10**9})
    handle = start_listener(settings, with_handoff=False)
    result = storescu(handle.port, [shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")])
    assert result.returncode != 0
    assert _status_in(result.stderr) == OUT_OF_RESOURCES, result.stderr
    assert _spooled_files(Path(settings.storage.spool_dir)) == []
    assert _count(settings.database.url, Instance) == 0


def test_database_outage_fails_the_push_then_the_retry_succeeds(postgres_server, tmp_path, start_listener, request):
    """PostgreSQL reached through a TCP proxy we cut mid-session: the real driver sees a dead server."""
    from tests.plugins.ingest import Backend

    postgres_server.truncate()
    proxy = TcpProxy((PG_HOST, PG_PORT))
    request.addfinalizer(proxy.close)
    b = Backend("postgres", postgres_server.url_via("127.0.0.1", proxy.port), "redis://127.0.0.1:6379/0",
                f"xt-outage-{proxy.port}.urgent", f"xt-outage-{proxy.port}.routine")  # fmt: skip
    request.addfinalizer(lambda: __import__("redis").Redis().delete(b.urgent, b.routine))
    settings = b.settings(tmp_path, handoff={"stability_window_s": 1.0})
    handle = start_listener(settings)
    spool = Path(settings.storage.spool_dir)
    first, second = pydicom_data_file("RG1_UNCR.dcm"), pydicom_data_file("RG1_J2KR.dcm")
    assert storescu(handle.port, [first]).returncode == 0

    proxy.cut()
    failed = storescu(handle.port, [second])
    assert failed.returncode != 0
    assert _status_in(failed.stderr) == DATABASE_UNAVAILABLE, failed.stderr
    assert len(_spooled_files(spool)) == 1  # the refused instance's file was not left behind

    proxy.open()
    retried = storescu(handle.port, [second])
    assert retried.returncode == 0, retried.stderr
    assert len(_spooled_files(spool)) == 2
    assert _count(postgres_server.url, Instance) == 2
    # Queued once per stable state: as many messages as hand-off generations, none twice.
    wait_for(lambda: _study_state(postgres_server.url) == ("queued", len(b.queued())),
             what="the study to be queued after the outage")  # fmt: skip
    assert sorted(q.generation for q in b.queued()) == list(range(1, len(b.queued()) + 1))


def test_logs_never_contain_patient_names_or_ids(backend, tmp_path, start_listener, log_text):
    settings = backend.settings(tmp_path)
    handle = start_listener(settings)
    files = real_files()
    identities: set[str] = set()
    for path in files:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        for value in (ds.get("PatientName"), ds.get("PatientID")):
            if value:
                identities.add(str(value))
                identities.update(part for part in re.split(r"[\^=]", str(value)) if len(part) >= 4)
        assert storescu(handle.port, [path]).returncode == 0
    # Refusals log too: make sure their messages are as clean.
    truncated = tmp_path / "t.dcm"
    truncated.write_bytes(files[0].read_bytes()[:4000])
    pynetdicom_store(handle.port, truncated, SC, BASELINE)
    wait_for(lambda: len(backend.queued()) >= 3, what="hand-offs (they log as well)")
    text = log_text()
    assert "stored instance" in text  # the capture did see the listener's records
    leaked = {i for i in identities if re.search(rf"(?<![\w.]){re.escape(i)}(?![\w.])", text)}
    assert not leaked, f"patient identity in logs: {leaked}"
