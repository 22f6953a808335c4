"""A real PACS as the sender: Orthanc, configured with the listener as a DICOM modality.

Orthanc is started by the test on loopback with its own temporary storage; a real study is
uploaded over its REST API and pushed with ``/modalities/{name}/store``, which is exactly
what a hospital PACS forwarding rule does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Instance, Study, StudyState
from db.session import make_engine, make_sessionmaker
from tests.conftest import free_port, pydicom_data_file
from tests.plugins.ingest import AE_TITLE, TcpProxy, dataset_bytes, wait_for, wire_datasets


class Orthanc:
    def __init__(self, root: Path, modality_port: int, dicom_port: int | None = None) -> None:
        self.http = free_port()
        self.dicom = dicom_port or free_port()
        config = {
            "Name": "xt-orthanc",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [],
            "DicomModalities": {"xray": [AE_TITLE, "127.0.0.1", modality_port]},
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("w")
        self.proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=self.log, stderr=self.log)
        wait_for(self._up, timeout=60, what="Orthanc's REST API")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with status {self.proc.returncode}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def orthanc_for(tmp_path: Path) -> Iterator:
    if shutil.which("Orthanc") is None:
        pytest.fail("the Orthanc binary is required (apt-get install orthanc; see scripts/system_deps.sh)")
    started: list[Orthanc] = []

    def _start(modality_port: int) -> Orthanc:
        root = tmp_path / "orthanc"
        root.mkdir()
        started.append(Orthanc(root, modality_port))
        return started[-1]

    yield _start
    for o in started:
        o.stop()


def test_orthanc_pushes_a_study_which_arrives_intact_and_is_queued(
    backend, tmp_path, start_listener, orthanc_for, request
):
    settings = backend.settings(tmp_path, listener={"allowed_callers": [{"ae_title": "ORTHANC", "host": "127.0.0.1"}]})
    handle = start_listener(settings)
    wire = TcpProxy(("127.0.0.1", handle.port), record=True)  # to see exactly what Orthanc sent
    request.addfinalizer(wire.close)
    orthanc = orthanc_for(wire.port)
    files = [pydicom_data_file(n) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")]
    for path in files:
        orthanc.post("/instances", path.read_bytes())
    studies = orthanc.get("/studies")
    assert isinstance(studies, list) and len(studies) == 1
    echo = orthanc.post("/modalities/xray/echo", b"{}")
    assert echo == {}
    job = orthanc.post("/modalities/xray/store", json.dumps({"Resources": studies, "Synchronous": True}).encode())
    assert isinstance(job, dict) and job.get("InstancesCount") == len(files) and job.get("FailedInstancesCount") == 0

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    queued = wait_for(backend.queued, what="the pushed study to be queued")
    assert [(q.study_uid, q.generation) for q in queued] == [(study_uid, 1)]
    engine = make_engine(settings.database.url)
    factory = make_sessionmaker(engine)

    def committed_state() -> StudyState:
        with factory() as s:
            return StudyState(s.scalars(select(Study.state)).one())

    # The hand-off publishes inside its claiming transaction and commits once the broker took
    # the message, so the message can be visible a moment before the state is.
    wait_for(lambda: committed_state() is StudyState.QUEUED, what="the claim to commit")
    with factory() as s:
        study = s.scalars(select(Study)).one()
        instances = list(s.scalars(select(Instance)))
    engine.dispose()
    assert (study.study_uid, study.state, study.calling_ae) == (study_uid, StudyState.QUEUED, "ORTHANC")
    assert study.patient_name == "CompressedSamples^RG1"
    assert len(instances) == len(files)
    # Orthanc (DCMTK inside) re-encodes while sending; what we stored is what came over the wire.
    sent = {hashlib.sha256(d).hexdigest() for d in wire_datasets(bytes(wire.recorded))}
    stored = {
        hashlib.sha256(dataset_bytes((Path(settings.storage.spool_dir) / i.spool_path).read_bytes())).hexdigest()
        for i in instances
    }
    assert len(sent) == len(files) and stored == sent
