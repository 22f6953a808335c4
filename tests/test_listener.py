"""The listener against real DCMTK peers and real images, on both backends.

What a modality relies on: C-ECHO answers, every C-STORE success means the instance is on
disk (SHA-256 as recorded) and in the database, and each study is handed to the queue
exactly once when it goes quiet.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Instance, Series, StateTransition, Study, StudyState
from db.session import make_engine, make_sessionmaker
from tests.conftest import pydicom_data_file, shared_file
from tests.plugins.ingest import (
    TcpProxy,
    dataset_bytes,
    dimse_statuses,
    echoscu,
    pynetdicom_store,
    real_files,
    storescu,
    transfer_syntax_of,
    wait_for,
    wire_datasets,
)


def _rows(url: str) -> tuple[list[Study], list[Series], list[Instance], list[StateTransition]]:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            return (
                list(s.scalars(select(Study))),
                list(s.scalars(select(Series))),
                list(s.scalars(select(Instance).order_by(Instance.id))),
                list(s.scalars(select(StateTransition).order_by(StateTransition.id))),
            )
    finally:
        engine.dispose()


def test_echoscu_gets_success(backend, tmp_path, start_listener):
    handle = start_listener(backend.settings(tmp_path))
    result = echoscu(handle.port)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr


def test_storescu_real_images_are_stored_recorded_and_queued_once(backend, tmp_path, start_listener):
    # One storescu run per file (each needs its own transfer syntax option): give the gaps
    # between runs of the same study room, or the study is rightly queued, re-opened, re-queued.
    settings = backend.settings(tmp_path, handoff={"stability_window_s": 3.0, "poll_interval_s": 0.1})
    handle = start_listener(settings)
    files = real_files()
    for path in files:
        result = storescu(handle.port, [path])
        assert result.returncode == 0, result.stderr
        assert dimse_statuses(result.stderr) == [0x0000]

    studies, series, instances, _ = _rows(settings.database.url)
    sent = {pydicom.dcmread(p, force=True, stop_before_pixels=True).StudyInstanceUID for p in files}
    assert {s.study_uid for s in studies} == sent
    # RG1_UNCI and RG1_J2KI share a SOP Instance UID with different bytes: a flagged version 2.
    assert len(instances) == len(files)
    versions = {(i.sop_instance_uid, i.version): i for i in instances}
    j2ki = pydicom.dcmread(pydicom_data_file("RG1_J2KI.dcm"), stop_before_pixels=True).SOPInstanceUID
    assert versions[(j2ki, 2)].conflicting_version and not versions[(j2ki, 1)].conflicting_version
    spool = Path(settings.storage.spool_dir)
    for inst in instances:
        data = (spool / inst.spool_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == inst.sha256
        assert len(data) == inst.size_bytes
        assert data[128:132] == b"DICM"
    rg1_series = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"), stop_before_pixels=True).SeriesInstanceUID
    rg1 = next(s for s in series if s.series_uid == rg1_series)
    assert (rg1.modality, rg1.body_part) == ("CR", "CHEST")
    assert len(studies) == len(sent) and all(s.calling_ae == "STORESCU" for s in studies)

    wait_for(lambda: len(backend.queued()) >= len(sent), what="one hand-off per study")
    time.sleep(settings.handoff.stability_window_s + 1)  # a second, wrong hand-off would show up by now
    queued = backend.queued()
    assert sorted(q.study_uid for q in queued) == sorted(sent)
    assert all(q.generation == 1 and q.queue == backend.routine for q in queued)
    studies, _, _, transitions = _rows(settings.database.url)
    assert {s.state for s in studies} == {StudyState.QUEUED}
    assert sum(1 for t in transitions if t.to_state == StudyState.QUEUED) == len(sent)


def _dcmtk_encode(source: Path, out: Path, tool: str, *options: str) -> Path:
    subprocess.run([tool, *options, str(source), str(out)], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def every_transfer_syntax(tmp_path_factory) -> list[Path]:
    """Each accepted transfer syntax, as real images: DCMTK encodes the real 10-bit NEMA chest CR
    losslessly/lossily; JPEG baseline and JPEG 2000 come as shipped (SIIM, RG1_J2KR/RG1_J2KI)."""
    folder = tmp_path_factory.mktemp("ts")
    nema = shared_file("dicom", "nema_cr_mono1_10bit_chest_no_meta.dcm")
    base = _dcmtk_encode(nema, folder / "base.dcm", "dcmconv", "+te")
    jobs = {
        "implicit": ("dcmconv", "+ti"),
        "big": ("dcmconv", "+tb"),
        "deflated": ("dcmconv", "+td"),
        "jpeg_extended": ("dcmcjpeg", "+ee"),
        "jpeg_p14": ("dcmcjpeg", "+el"),
        "jpeg_sv1": ("dcmcjpeg", "+e1"),
        "jpegls_lossless": ("dcmcjpls", "+el"),
        "jpegls_near": ("dcmcjpls", "+en"),
        "rle": ("dcmcrle",),
    }
    files = [base] + [_dcmtk_encode(base, folder / f"{name}.dcm", *cmd) for name, cmd in jobs.items()]
    files += [
        shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm"),
        pydicom_data_file("RG1_J2KR.dcm"),
        pydicom_data_file("RG1_J2KI.dcm"),
    ]
    return files


def test_every_transfer_syntax_arrives_byte_identical(sqlite_backend, tmp_path, start_listener, every_transfer_syntax):
    settings = sqlite_backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    accepted = set(settings.listener.transfer_syntax_uids())
    sent_syntaxes = set()
    for path in every_transfer_syntax:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ts = transfer_syntax_of(path)
        sent_syntaxes.add(ts)
        status = pynetdicom_store(handle.port, path, ds.SOPClassUID, ts)
        assert status.Status == 0x0000, (path.name, hex(status.Status))
    assert sent_syntaxes == accepted
    _, _, instances, _ = _rows(settings.database.url)
    by_ts = {i.transfer_syntax_uid: i for i in instances}
    for path in every_transfer_syntax:
        inst = by_ts[transfer_syntax_of(path)]
        stored = (Path(settings.storage.spool_dir) / inst.spool_path).read_bytes()
        assert dataset_bytes(stored) == dataset_bytes(path.read_bytes()), path.name
        assert pydicom.dcmread(Path(settings.storage.spool_dir) / inst.spool_path).file_meta.TransferSyntaxUID == (
            inst.transfer_syntax_uid
        )


def test_real_files_arrive_exactly_as_sent_on_the_wire(sqlite_backend, tmp_path, start_listener):
    """DCMTK may re-encode a file while sending; what we store must equal what came over the wire."""
    settings = sqlite_backend.settings(tmp_path)
    handle = start_listener(settings, with_handoff=False)
    proxy = TcpProxy(("127.0.0.1", handle.port), record=True)
    try:
        files = real_files()
        for path in files:
            result = storescu(proxy.port, [path])
            assert result.returncode == 0, result.stderr
    finally:
        proxy.close()
    on_wire = wire_datasets(bytes(proxy.recorded))
    assert len(on_wire) == len(files)
    _, _, instances, _ = _rows(settings.database.url)
    stored = [dataset_bytes((Path(settings.storage.spool_dir) / i.spool_path).read_bytes()) for i in instances]
    assert stored == on_wire
    # Files DCMTK sends unchanged are also identical to the source file.
    assert dataset_bytes(shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm").read_bytes()) in stored


def test_the_senders_transfer_syntax_preference_is_honoured(sqlite_backend, tmp_path, start_listener):
    """A sender offering "JPEG 2000, then uncompressed" must not be made to decompress for us."""
    from pynetdicom import AE

    handle = start_listener(sqlite_backend.settings(tmp_path), with_handoff=False)
    cr, sc = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.7"
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(cr, ["1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.add_requested_context(sc, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"])
    for _ in range(2):  # per association: the second one is negotiated the same way
        assoc = ae.associate("127.0.0.1", handle.port, ae_title="XRAY_TRIAGE")
        try:
            chosen = {str(c.abstract_syntax): str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        finally:
            assoc.release()
        assert chosen == {cr: "1.2.840.10008.1.2.4.91", sc: "1.2.840.10008.1.2"}
