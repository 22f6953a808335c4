"""Ingest throughput: the xray-triage listener against DCMTK's own storescp, same files, same run.

40 (BENCH_INGEST_N) DX For Presentation instances of 2500x2048 16-bit pixels (about 10 MB
each, built from the real RG1 chest CR in pydicom-data, resampled) are sent with DCMTK
`storescu` over one association, alternately to `storescp` (writing every file to disk, its
default: no fsync, no database) and to `xray-triage listen` (fsync + atomic rename + SHA-256 +
database row per instance, hand-off thread running), BENCH_INGEST_ROUNDS times each.  Each
round gets a fresh output folder / spool and database so duplicates never short-cut the work,
and starts after `sync` so no run pays for the previous run's unflushed writes.

Both receivers get the same maximum PDU (BENCH_INGEST_PDU, default 131072, the largest
storescp accepts); storescu sends PDUs of the receiver's maximum size.  Reported: instances/s
per receiver (total instances / total storescu wall time over all rounds), and the ratio
listener / storescp.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
ROWS, COLS = 2500, 2048
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _source_pixels() -> np.ndarray:
    """The real RG1 chest CR (MONOCHROME1, 15-bit) as a 2500x2048 MONOCHROME2 16-bit image."""
    import data_store  # noqa: F401 - pydicom-data registers its files with pydicom
    from pydicom.data import get_testdata_file

    ds = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    arr = ds.pixel_array.astype(np.int32)
    arr = arr.max() - arr  # MONOCHROME1 -> MONOCHROME2
    img = Image.fromarray(arr, mode="I").resize((COLS, ROWS), Image.BILINEAR)
    out = np.asarray(img, dtype=np.float64)
    out = (out - out.min()) / max(1.0, float(out.max() - out.min())) * 65535.0
    return out.astype(np.uint16)


def make_instances(folder: Path, n: int) -> list[Path]:
    pixels = _source_pixels()
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = DX_FOR_PRESENTATION
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "Bench^Ingest", "BENCH-0001"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.InstanceNumber = i + 1
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.roll(pixels, i, axis=1).tobytes()
        path = folder / f"dx_{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"receiver did not open port {port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _send(ae_title: str, port: int, files: list[Path]) -> float:
    # Start every timed run with no dirty pages left by the previous one: storescp does not
    # fsync, so its writes would otherwise be flushed during (and billed to) the next run.
    os.sync()
    start = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    return elapsed


def run_storescp(work: Path, files: list[Path], pdu: int) -> float:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        ["storescp", "--max-pdu", str(pdu), "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        elapsed = _send("STORESCP", port, files)
    finally:
        _stop(proc)
    stored = len(list(out.iterdir()))
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} files")
    return elapsed


def run_listener(work: Path, files: list[Path], pdu: int) -> float:
    from sqlalchemy import func, select

    from db.models import Instance
    from db.session import make_engine, upgrade

    root = work / "listener"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    port = _free_port()
    db_url = f"sqlite:///{root / 'xray-triage.db'}"
    config = {
        "listener": {"ae_title": "XRAY_TRIAGE", "bind_address": "127.0.0.1", "port": port, "max_pdu": pdu},
        "storage": {"spool_dir": str(root / "spool"), "min_free_mb": 1024},
        "database": {"url": db_url},
        "broker": {"url": f"sqla+sqlite:///{root / 'broker.db'}"},
        "log_level": "WARNING",
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    upgrade(db_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "xray_triage.cli", "--config", str(config_path), "listen"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        elapsed = _send("XRAY_TRIAGE", port, files)
    finally:
        _stop(proc)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        recorded = conn.scalar(select(func.count()).select_from(Instance))
    engine.dispose()
    if recorded != len(files):
        raise RuntimeError(f"listener recorded {recorded} of {len(files)} instances")
    return elapsed


def main() -> dict[str, object]:
    n = int(os.environ.get("BENCH_INGEST_N", "40"))
    rounds = int(os.environ.get("BENCH_INGEST_ROUNDS", "3"))
    pdu = int(os.environ.get("BENCH_INGEST_PDU", "131072"))
    with tempfile.TemporaryDirectory(prefix="xt-bench-ingest-") as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        files = make_instances(work / "in", n)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        times: dict[str, list[float]] = {"storescp": [], "listener": []}
        for _ in range(rounds):
            times["storescp"].append(run_storescp(work, files, pdu))
            times["listener"].append(run_listener(work, files, pdu))
    rate = {k: n * rounds / sum(v) for k, v in times.items()}
    result: dict[str, object] = {
        "instances": n,
        "rounds": rounds,
        "megabytes_per_round": round(size_mb, 1),
        "max_pdu": pdu,
        "storescp_instances_per_s": round(rate["storescp"], 2),
        "listener_instances_per_s": round(rate["listener"], 2),
        "ratio_listener_over_storescp": round(rate["listener"] / rate["storescp"], 3),
        "round_seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "median_round_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
    }
    print(
        f"storescp: {result['storescp_instances_per_s']} instances/s, "
        f"xray-triage listener: {result['listener_instances_per_s']} instances/s, "
        f"ratio {result['ratio_listener_over_storescp']} "
        f"({n} x {ROWS}x{COLS} 16-bit DX, {rounds} rounds, max PDU {pdu})"
    )
    return result
