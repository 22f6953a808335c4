"""Time to a priority with the shipped configuration, per encoding a PACS sends.

The figure a radiologist feels: from the end of the sending association (DCMTK ``storescu``
has released it) to the committed priority (``study.finished_at``), with
``config/xray-triage.yaml`` exactly as shipped (embedded SQLite and broker, the release
grace and the stability window as set there, one worker process, the shipped model); only
the data folder and the listener's port are this run's own.  One association per study,
paced so that studies do not queue behind each other; p50 and p95 per encoding:

* uncompressed DX, 2500x2048 16-bit, explicit VR LE (built from real shared chest images);
* JPEG 2000 lossless CR, 1955x1841 (pydicom-data RG1_J2KR);
* JPEG baseline CR, 1024x1024 8-bit (the shared SIIM file).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config" / "xray-triage.yaml"
SHARED = Path(os.environ.get("XRAY_TRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
# storescu's option proposing each file's own transfer syntax.
STORESCU_OPTION = {"1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.50": "-xy"}
GOALS_P95_S = {"uncompressed DX": 1.0, "JPEG 2000 lossless CR": 1.5, "JPEG baseline CR": 1.0}


def sources(folder: Path) -> dict[str, Path]:
    from pydicom.data import get_testdata_file

    from bench.e2e.dx import dx_from_image

    nih = sorted((SHARED / "nih-findings" / "images").glob("*.png"))[0]
    return {
        "uncompressed DX": dx_from_image(nih, folder / "dx.dcm"),
        "JPEG 2000 lossless CR": Path(str(get_testdata_file("RG1_J2KR.dcm"))),
        "JPEG baseline CR": SHARED / "dicom" / "siim_cr_chest_pa_jpeg_baseline.dcm",
    }


def fresh_copy(source: Path, out: Path) -> tuple[Path, str, str]:
    """The file under new Study/Series/SOP UIDs (the pixel data untouched); (path, study UID, option)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out, str(ds.StudyInstanceUID), STORESCU_OPTION[str(ds.file_meta.TransferSyntaxUID)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _push(ae_title: str, port: int, path: Path, option: str) -> datetime:
    subprocess.run(["storescu", "-aec", ae_title, option, "127.0.0.1", str(port), str(path)],
                   check=True, capture_output=True)  # fmt: skip
    return datetime.now(UTC)  # storescu has released the association


def _finished(factory: Any, uid: str) -> tuple[datetime, str] | None:
    from db.models import Study

    with factory() as s:
        row = s.execute(select(Study.finished_at, Study.state).where(Study.study_uid == uid)).first()
    return (row[0], str(row[1])) if row is not None and row[0] is not None else None


def _wait(factory: Any, uid: str, timeout_s: float = 600.0) -> tuple[datetime, str]:
    deadline = time.monotonic() + timeout_s
    while (done := _finished(factory, uid)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"study {uid} was not scored within {timeout_s:.0f} s")
        time.sleep(0.02)
    return done


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


def main(studies: int = 30, gap_s: float = 1.0) -> dict[str, Any]:
    import tempfile

    from db.session import make_engine, make_sessionmaker, upgrade
    from settings.config import load_settings
    from xray_triage.services import start_intake

    with tempfile.TemporaryDirectory(prefix="xt-bench-shipped-") as tmp:
        home = Path(tmp)
        env = {**os.environ, "XRAY_TRIAGE_HOME": str(home), "XRAY_TRIAGE_LISTENER__PORT": str(_free_port()),
               "XRAY_TRIAGE_LOG_LEVEL": "WARNING"}  # fmt: skip
        env.pop("XRAY_TRIAGE_CONFIG", None)
        settings = load_settings(SHIPPED_CONFIG, environ=env)
        upgrade(settings.database.url)
        factory = make_sessionmaker(make_engine(settings.database.url))
        log = (home / "worker.log").open("ab")
        worker = subprocess.Popen([sys.executable, "-m", "xray_triage.cli", "--config", str(SHIPPED_CONFIG), "worker"],
                                  cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        intake = start_intake(settings)
        ae, port = settings.listener.ae_title, intake.port
        results: dict[str, Any] = {
            "configuration": str(SHIPPED_CONFIG.relative_to(REPO)),
            "release_grace_s": settings.handoff.release_grace_s,
            "stability_window_s": settings.handoff.stability_window_s,
            "broker": settings.broker.url.split(":")[0],
            "database": settings.database.url.split(":")[0],
            "encodings": {},
        }
        try:
            files = sources(home)
            for name, source in files.items():  # warm-up: the model loaded, each decoder used once
                path, uid, option = fresh_copy(source, home / f"warm-{len(name)}.dcm")
                _push(ae, port, path, option)
                _wait(factory, uid)
            for name, source in files.items():
                latencies, states = [], set()
                for i in range(studies):
                    path, uid, option = fresh_copy(source, home / f"s{i}.dcm")
                    ended = _push(ae, port, path, option)
                    finished, state = _wait(factory, uid)
                    latencies.append((finished - ended).total_seconds())
                    states.add(state)
                    path.unlink()
                    time.sleep(gap_s)
                p50, p95 = statistics.median(latencies), _p95(latencies)
                goal = GOALS_P95_S[name]
                results["encodings"][name] = {
                    "studies": studies, "p50_s": p50, "p95_s": p95, "max_s": max(latencies),
                    "goal_p95_s": goal, "met": p95 <= goal, "states": sorted(states),
                }  # fmt: skip
                print(f"  {name:<22} association end -> priority: p50 {p50:.2f} s, p95 {p95:.2f} s "
                      f"(max {max(latencies):.2f} s, {studies} studies; goal p95 <= {goal} s: "
                      f"{'met' if p95 <= goal else 'NOT met'}); states {sorted(states)}", flush=True)  # fmt: skip
        finally:
            stop_all(intake, worker, factory)
    return results


def stop_all(intake: Any, worker: subprocess.Popen[bytes], factory: Any) -> None:
    """The in-process intake, the worker process (TERM, then KILL after a minute), the DB pool."""
    intake.stop()
    worker.terminate()
    try:
        worker.wait(60)
    except subprocess.TimeoutExpired:
        worker.kill()
    factory.kw["bind"].dispose()
