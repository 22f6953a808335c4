"""Results back to a real PACS (Orthanc) and a RIS (an MLLP receiver), through the export queue.

A study pushed with DCMTK is scored by a worker; an export-only worker sends the SR and the
heatmap Secondary Captures to Orthanc and the ORU^R01 to the receiver.  A destination that is
down is retried, then export_failed with its reason, while the other still receives
everything; once it is back, "retry now" delivers exactly once, with the same UIDs.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.models import AuditEvent, Export, ExportState, InstanceResult
from db.session import session_scope
from hl7_io.oru import parse_oru
from models.findings import get_finding
from tests.conftest import free_port, pydicom_data_file, shared_file
from tests.plugins.ingest import wait_for
from tests.plugins.mllp import MllpReceiver
from tests.plugins.scoring import ScoringEnv, as_new_study, open_scoring_env, start_env_worker
from tests.plugins.worklist import PASSWORD, csrf_from
from tests.test_orthanc import Orthanc
from worklist.app import create_app
from worklist.localtime import local_time, site_zone
from worklist.users import add_user
from xray_triage.status import collect_status

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
# Pneumonia flagged on every film, so each one gets a heatmap image.
FLAG_PNEUMONIA = {"thresholds": {"pneumonia": 0.0}}


@pytest.fixture
def orthancs(tmp_path: Path) -> Iterator:
    if shutil.which("Orthanc") is None:
        pytest.fail("the Orthanc binary is required (apt-get install orthanc; see scripts/system_deps.sh)")
    started: list[Orthanc] = []

    def start(name: str, dicom_port: int | None = None) -> Orthanc:
        root = tmp_path / f"orthanc-{name}"
        root.mkdir()
        started.append(Orthanc(root, free_port(), dicom_port))
        return started[-1]

    yield start
    for o in started:
        o.stop()


def pacs(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "kind": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port}


def exports_of(env: ScoringEnv, study_id: int) -> dict[str, Export]:
    with env.factory() as s:
        return {e.destination: e for e in s.scalars(select(Export).where(Export.study_id == study_id))}


def wait_exports(
    env: ScoringEnv, study_id: int, want: dict[str, ExportState], timeout: float = 120
) -> dict[str, Export]:
    def done() -> bool:
        got = exports_of(env, study_id)
        return all(name in got and got[name].state == state for name, state in want.items())

    wait_for(done, timeout=timeout, interval=0.3, what=f"exports to reach {want}")
    return exports_of(env, study_id)


def orthanc_instances(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    found = orthanc.post(
        "/tools/find", json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode()
    )
    assert isinstance(found, list)
    if not found:
        return []
    [study] = found
    out = []
    for inst in orthanc.get(f"/studies/{study}/instances"):  # type: ignore[union-attr]
        with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http}/instances/{inst['ID']}/file", timeout=30) as r:
            out.append(pydicom.dcmread(io.BytesIO(r.read())))
    return out


def dciodvfy_errors(tmp: Path, ds: pydicom.Dataset) -> list[str]:
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def sr_probabilities(sr: pydicom.Dataset) -> dict[tuple[str, str], float]:
    """(source SOP Instance UID, finding code) -> probability, read from the SR tree."""
    out = {}
    [imaging] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in imaging.ContentSequence:
        items = group.ContentSequence
        code = next(
            i.ConceptCodeSequence[0].CodeValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121071"
        )
        source = next(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE")
        value = next(
            float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "122157"
        )
        out[(str(source), str(code))] = value
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_results_reach_the_pacs_and_the_ris_under_the_original_study(tmp_path: Path, orthancs, backend: str) -> None:
    orthanc = orthancs("pacs")
    ris = MllpReceiver()
    destinations = [
        pacs("pacs", orthanc.dicom),
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port},
    ]
    try:
        with open_scoring_env(
            "sqlite", tmp_path / "env", triage=FLAG_PNEUMONIA, export={"destinations": destinations}
        ) as env:
            start_env_worker(env, queues=env.settings.export.queue)
            files = [
                as_new_study(pydicom_data_file("RG1_J2KR.dcm"), tmp_path / "push" / "rg1.dcm"),
                as_new_study(
                    shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm"), tmp_path / "push" / "siim.dcm"
                ),
            ]
            for path in files:
                env.push([path])
            for path in files:
                source = pydicom.dcmread(path, stop_before_pixels=True)
                study = env.wait_final(str(source.StudyInstanceUID))
                exports = wait_exports(env, study.id, {"pacs": ExportState.SENT, "ris": ExportState.SENT})
                with env.factory() as s:
                    [result] = s.scalars(select(InstanceResult).where(InstanceResult.study_id == study.id)).all()
                # In Orthanc, under the original Study Instance UID: one SR, a heatmap image per flagged finding.
                stored = orthanc_instances(orthanc, str(source.StudyInstanceUID))
                flagged = [f for f, on in (result.flags or {}).items() if on]
                assert "pneumonia" in flagged
                classes = sorted(str(d.SOPClassUID) for d in stored)
                assert classes == sorted([SR_CLASS] + [SC_CLASS] * len(flagged)), classes
                sent_uids = {o["uid"] for o in exports["pacs"].objects or []}
                assert {str(d.SOPInstanceUID) for d in stored} == sent_uids
                for ds in stored:
                    assert not dciodvfy_errors(tmp_path, ds)
                [sr] = [d for d in stored if d.SOPClassUID == SR_CLASS]
                [sc] = [d for d in stored if d.SOPClassUID == SC_CLASS and "Pneumonia" in d.SeriesDescription]
                # The SR carries exactly the scores the database holds.
                assert sr_probabilities(sr) == {
                    (str(source.SOPInstanceUID), get_finding(name).code.value): pytest.approx(score, abs=1e-6)
                    for name, score in (result.scores or {}).items()
                }
                assert (sc.Rows, sc.Columns, sc.BurnedInAnnotation) == (source.Rows, source.Columns, "YES")
                # The RIS got the priority message for this study, and it says what the database says.
                parsed = [parse_oru(m) for m in ris.messages]
                [msg] = [p for p in parsed if p.study_uid == str(source.StudyInstanceUID)]
                assert msg.control_id == f"XT{exports['ris'].id}"
                assert msg.accession_number == (study.accession_number or "")
                assert msg.priority == {0: "critical", 1: "urgent", 2: "routine"}[study.priority]
                assert msg.reason == study.priority_reason
                assert msg.probabilities == {
                    get_finding(n).code.value: pytest.approx(v, abs=1e-4) for n, v in (result.scores or {}).items()
                }
                assert study.time_to_priority_s is not None and study.time_to_priority_s >= 0
            # /metrics counts both pushes in the time-to-priority histogram of the calling AE.
            metrics = TestClient(create_app(env.settings)).get("/metrics").text
            assert f'xray_triage_time_to_priority_seconds_count{{calling_ae="{study.calling_ae}"}} 2.0' in metrics
    finally:
        ris.close()


def test_a_dead_destination_fails_alone_and_retry_delivers_exactly_once(tmp_path: Path, orthancs) -> None:
    good = orthancs("good")
    down_port = free_port()
    destinations = [pacs("down", down_port), pacs("good", good.dicom)]
    with open_scoring_env(
        "sqlite", tmp_path / "env", triage=FLAG_PNEUMONIA, export={"destinations": destinations}
    ) as env:
        start_env_worker(env, queues=env.settings.export.queue)
        path = as_new_study(pydicom_data_file("RG1_J2KR.dcm"), tmp_path / "push" / "rg1.dcm")
        env.push([path])
        study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        study = env.wait_final(study_uid)
        exports = wait_exports(env, study.id, {"good": ExportState.SENT, "down": ExportState.FAILED})
        down = exports["down"]
        assert down.attempts == env.settings.export.max_attempts
        assert down.sent_at is None and "no association with ORTHANC at 127.0.0.1" in (down.last_error or "")
        delivered = {o["uid"] for o in exports["good"].objects or []}
        assert len(delivered) >= 2  # the SR and at least the pneumonia heatmap
        assert len(orthanc_instances(good, study_uid)) == len(delivered)

        # The study page shows each destination's state; only an admin gets "retry now".
        web = TestClient(create_app(env.settings), follow_redirects=False)
        with session_scope(env.factory) as s:
            add_user(s, "ada", PASSWORD, "admin")
            add_user(s, "rad", PASSWORD, "radiologist")
        rad = TestClient(web.app, follow_redirects=False)
        rad.post("/api/login", json={"username": "rad", "password": PASSWORD}).raise_for_status()
        assert "Retry now" not in rad.get(f"/studies/{study_uid}").text
        web.post("/api/login", json={"username": "ada", "password": PASSWORD}).raise_for_status()
        page = web.get(f"/studies/{study_uid}").text
        assert "failed: no association with ORTHANC" in page and "Retry now" in page and "structured report" in page
        admin = web.get("/admin").text
        assert 'id="failed-exports"' in admin and "no association with ORTHANC" in admin

        # The destination comes back; the admin presses "retry now".
        back = orthancs("back", down_port)
        form = {"csrf_token": csrf_from(page)}
        r = web.post(f"/studies/{study_uid}/exports/{down.id}/retry", data=form)
        assert r.status_code == 303, r.text
        with env.factory() as s:
            audit = s.scalars(select(AuditEvent).where(AuditEvent.action == "export_retry")).all()
        assert [(a.username, a.study_uid, a.detail) for a in audit] == [("ada", study_uid, "down")]
        exports = wait_exports(env, study.id, {"down": ExportState.SENT})
        assert exports["down"].attempts == 1 and exports["down"].last_error is None
        stored = orthanc_instances(back, study_uid)
        assert sorted(str(d.SOPInstanceUID) for d in stored) == sorted(delivered)  # same UIDs, once each
        assert len(orthanc_instances(good, study_uid)) == len(delivered)  # the good one got nothing twice
        # In the site's zone, to the minute (worklist.localtime), as every page shows times.
        shown = local_time(exports["down"].sent_at, site_zone(env.settings.web.time_zone))
        assert f"sent {shown}" in web.get(f"/studies/{study_uid}").text


def test_a_refusing_ris_is_export_failed_with_its_answer(tmp_path: Path) -> None:
    ris = MllpReceiver()
    ris.ack_code = "AE"
    try:
        destinations = [{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port}]
        with open_scoring_env("sqlite", tmp_path / "env", export={"destinations": destinations}) as env:
            start_env_worker(env, queues=env.settings.export.queue)
            path = as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "push" / "rg1.dcm")
            env.push([path])
            study = env.wait_final(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
            [failed] = wait_exports(env, study.id, {"ris": ExportState.FAILED}).values()
            assert "receiver answered AE: test RIS refuses it" in (failed.last_error or "")
            assert len(ris.messages) == env.settings.export.max_attempts
            assert {parse_oru(m).control_id for m in ris.messages} == {f"XT{failed.id}"}  # the same message each time
            assert collect_status(env.settings)["exports"]["export_failed"] == 1  # `xray-triage status` counts it
    finally:
        ris.close()


def test_silent_mode_holds_exports_unless_the_site_allows_them(tmp_path: Path) -> None:
    ris = MllpReceiver()
    try:
        destinations = [{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port}]
        with open_scoring_env(
            "sqlite", tmp_path / "env", triage={"silent_mode": True}, export={"destinations": destinations}
        ) as env:
            start_env_worker(env, queues=env.settings.export.queue)
            path = as_new_study(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "push" / "rg1.dcm")
            env.push([path])
            study = env.wait_final(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
            [held] = wait_exports(env, study.id, {"ris": ExportState.HELD}).values()
            assert "silent mode" in (held.last_error or "") and held.attempts == 0 and not ris.messages
    finally:
        ris.close()
