"""kill -9 of the listener process while several DCMTK senders push: nothing acknowledged is lost,
and after the restart the spool and the database agree (count and SHA-256), orphans quarantined."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Instance
from db.session import make_engine
from dicom_io.reconcile import QUARANTINE_DIRNAME
from dicom_io.spool import STAGING_DIRNAME
from tests.conftest import REPO, pydicom_data_file
from tests.plugins.ingest import echoscu, storescu, wait_for
from tests.plugins.netfuzz import check_invariants


def _copies(source: Path, folder: Path, n: int) -> list[Path]:
    """`n` copies of a real radiograph under new SOP Instance UIDs (one study), so each is a new instance."""
    folder.mkdir()
    ds = pydicom.dcmread(source)
    out = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "xray_triage.cli", "--config", str(config), "listen"],
            cwd=REPO,
            stdout=fh,
            stderr=fh,
            stdin=subprocess.DEVNULL,
        )


def _rows(url: str) -> dict[str, str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {uid: sha for uid, sha in conn.execute(select(Instance.sop_instance_uid, Instance.sha256))}
    finally:
        engine.dispose()


def test_kill_9_mid_push_loses_nothing_acknowledged_and_spool_equals_database(sqlite_backend, tmp_path):
    settings = sqlite_backend.settings(tmp_path)
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    port = settings.listener.port
    files = _copies(pydicom_data_file("RG1_UNCR.dcm"), tmp_path / "in", 24)  # 7 MB each: kills land mid-transfer
    log = tmp_path / "listener.log"
    proc = _start(config, log)
    wait_for(lambda: echoscu(port).returncode == 0, timeout=120, what="the listener to start")

    acknowledged: list[str] = []
    lock = threading.Lock()

    def sender(chunk: list[Path]) -> None:
        for path in chunk:
            if storescu(port, [path]).returncode == 0:
                with lock:
                    acknowledged.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))

    threads = [threading.Thread(target=sender, args=(files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(_rows(settings.database.url)) >= 4, timeout=120, what="a few instances to arrive")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for t in threads:
        t.join()
    assert 0 < len(acknowledged) < len(files), "the kill should land in the middle of the pushes"

    proc = _start(config, log)
    try:
        wait_for(lambda: echoscu(port).returncode == 0, timeout=120, what="the listener to restart")
        rows = _rows(settings.database.url)
        assert set(acknowledged) <= set(rows), "an acknowledged instance is missing from the database"
        spool = Path(settings.storage.spool_dir)
        inv = check_invariants(port, settings.database.url, spool, files[-1])
        assert inv.problems == [], inv.problems
        assert not list((spool / STAGING_DIRNAME).glob("*.part"))
        # Whatever was on disk without a row (in flight at the kill) is kept aside, never deleted silently.
        quarantined = list((spool / QUARANTINE_DIRNAME).rglob("*.dcm")) if (spool / QUARANTINE_DIRNAME).exists() else []
        for path in quarantined:
            assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) not in acknowledged
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "Traceback" not in log.read_text()
