"""bench/e2e: DICOM push -> committed score, with the real listener, hand-off, Redis, PostgreSQL and worker.

Studies are 2500x2048 16-bit DX built from the real shared chest images (bench/e2e/dx.py),
pushed one association per study with DCMTK ``storescu``.  For 1 and 2 worker processes:

* latency: studies arrive one every ``--interval`` seconds; per study, the time from the end
  of its association (storescu returned) to its score being committed (``study.finished_at``);
  p50 and p95 are printed.  The stability window is set to its minimum and reported: it is
  part of every figure by design (a study is not scored before it is quiet).
* throughput: a backlog (``--backlog``, default 200 studies) pushed with the hand-off paused,
  then released at once; studies per second from the first hand-off to the last commit.

In the same run, with no worker running, the two irreducible stages are measured in this
process on the same files: the bare decode (``dcmread(path).pixel_array``) and the bare
forward pass of the same model on the same tensors (batch 1, and batch 16, the worker's
forward batch).  The goal: backlog throughput >= 75 % of the slower of the two.

    python -m bench e2e          # or: python -m bench.e2e [--studies 50] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, text

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("XRAY_TRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))
PG_ADMIN_URL = os.environ.get("XT_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("XT_BENCH_REDIS", "redis://127.0.0.1:6379/0")
MIN_STABILITY_WINDOW_S = 0.1  # settings/config.py HandoffConfig lower bound


def _sources(n: int) -> list[Path]:
    """Real chest images: Kermany (children) and NIH (adults), alternating."""
    kermany = sorted((SHARED / "kermany" / "train" / "NORMAL").iterdir())[: n // 2 + 1]
    kermany += sorted((SHARED / "kermany" / "train" / "PNEUMONIA").iterdir())[: n // 2 + 1]
    nih = sorted((SHARED / "nih-findings" / "images").glob("*.png"))[:n]
    mixed = [p for pair in zip(kermany, nih, strict=False) for p in pair]
    return mixed[:n]


def build_studies(n: int, folder: Path) -> list[Path]:
    from bench.e2e.dx import dx_from_image

    return [dx_from_image(src, folder / f"study{i:03d}.dcm") for i, src in enumerate(_sources(n))]


def _fresh_uids(files: list[Path], folder: Path) -> list[tuple[Path, str]]:
    """Copies under new Study/Series/SOP UIDs, so every run pushes new studies."""
    import pydicom
    from pydicom.uid import generate_uid

    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{i:04d}-{f.name}"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, str(ds.StudyInstanceUID)))
    return out


class Database:
    def __init__(self, name: str) -> None:
        from db.session import make_engine, upgrade

        self.name = name
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        upgrade(self.url)

    def drop(self) -> None:
        from db.session import make_engine

        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        admin.dispose()


def _settings(db_url: str, var: Path, tag: str) -> Any:
    import socket

    from settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Settings.model_validate(
        {
            "listener": {"ae_title": "XRAY_TRIAGE", "port": port, "max_pdu": 0},
            "storage": {"spool_dir": str(var / "spool"), "min_free_mb": 256},
            "database": {"url": db_url},
            "broker": {"url": REDIS_URL},
            "queues": {"urgent": f"xt-bench-{tag}.urgent", "routine": f"xt-bench-{tag}.routine"},
            "handoff": {"stability_window_s": MIN_STABILITY_WINDOW_S, "poll_interval_s": 0.05},
            "worker": {"heatmap_dir": str(var / "heatmaps")},
            "log_level": "WARNING",
        }
    )


def _push(port: int, path: Path) -> datetime:
    subprocess.run(
        ["storescu", "-aec", "XRAY_TRIAGE", "-xe", "127.0.0.1", str(port), str(path)],
        check=True,
        capture_output=True,
    )
    return datetime.now(UTC)  # storescu has released the association


def _finished(factory: Any, uids: list[str]) -> dict[str, Any]:
    from db.models import Study

    with factory() as s:
        rows = s.execute(
            select(Study.study_uid, Study.finished_at, Study.queued_at, Study.state, Study.processing_at).where(
                Study.study_uid.in_(uids)
            )
        ).all()
    return {r[0]: r for r in rows if r[1] is not None}


def _wait_all(factory: Any, uids: list[str], timeout: float = 1800.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        done = _finished(factory, uids)
        if len(done) == len(uids) or time.monotonic() > deadline:
            return done
        time.sleep(0.2)


def _start_worker(settings: Any, var: Path, concurrency: int) -> subprocess.Popen[bytes]:
    import yaml

    config = var / "worker.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    log = (var / "worker.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "xray_triage.cli", "--config", str(config), "worker", "--concurrency", str(concurrency)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _p95(sorted_values: list[float]) -> float:
    """Nearest-rank 95th percentile of an already sorted list."""
    return sorted_values[max(0, math.ceil(0.95 * len(sorted_values)) - 1)]


def run_config(files: list[Path], concurrency: int, interval_s: float, root: Path, backlog_n: int) -> dict[str, Any]:
    """One worker configuration: warm-up, paced latency run, backlog throughput run."""
    from broker import make_celery
    from db.session import make_engine, make_sessionmaker
    from worker.handoff import HandoffThread, celery_publisher
    from xray_triage.services import start_intake

    var = root / f"c{concurrency}"
    var.mkdir()
    db = Database(f"xt_bench_{os.getpid()}_{concurrency}")
    settings = _settings(db.url, var, f"{os.getpid()}-{concurrency}")
    factory = make_sessionmaker(make_engine(db.url))
    worker = _start_worker(settings, var, concurrency)
    listener = start_intake(settings)
    try:
        # Warm-up: every pool process has loaded the model before anything is timed.
        warm = _fresh_uids(files[: 2 * concurrency], var / "warm")
        for path, _ in warm:
            _push(listener.port, path)
        _wait_all(factory, [u for _, u in warm])

        paced = _fresh_uids(files, var / "paced")
        ends: dict[str, datetime] = {}
        next_at = time.monotonic()
        for path, uid in paced:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval_s
            ends[uid] = _push(listener.port, path)
        done = _wait_all(factory, list(ends))
        latencies = sorted((done[u][1] - ends[u]).total_seconds() for u in ends if u in done)
        # Where the time goes: association end -> hand-off -> task start -> committed.
        segments = {
            "handoff_s": sorted((done[u][2] - ends[u]).total_seconds() for u in done),
            "queue_wait_s": sorted((done[u][4] - done[u][2]).total_seconds() for u in done),
            "processing_s": sorted((done[u][1] - done[u][4]).total_seconds() for u in done),
        }

        # Backlog: push with the hand-off paused, then release every study at once.
        listener.stop()
        listener = start_intake(settings, with_handoff=False)
        backlog = _fresh_uids([files[i % len(files)] for i in range(backlog_n)], var / "backlog")
        for path, _ in backlog:
            _push(listener.port, path)
        handoff = HandoffThread(settings, factory, celery_publisher(make_celery(settings)))
        handoff.start()
        try:
            done_b = _wait_all(factory, [u for _, u in backlog])
        finally:
            handoff.stop()
        first_queued = min(r[2] for r in done_b.values())
        last_done = max(r[1] for r in done_b.values())
        span = (last_done - first_queued).total_seconds()
        states = sorted({str(r[3]) for r in [*done.values(), *done_b.values()]})
        return {
            "worker_processes": concurrency,
            "studies": len(paced),
            "arrival_interval_s": interval_s,
            "latency_p50_s": statistics.median(latencies),
            "latency_p95_s": _p95(latencies),
            "latency_max_s": latencies[-1],
            "scored_latency": len(latencies),
            "segments_p50_p95_s": {k: (statistics.median(v), _p95(v)) for k, v in segments.items()},
            "backlog_studies": len(backlog),
            "throughput_studies_per_s": len(done_b) / span if span > 0 else float("nan"),
            "throughput_span_s": span,
            "final_states": states,
        }
    finally:
        from bench.e2e.shipped import stop_all

        stop_all(listener, worker, factory)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(settings.queues.urgent, settings.queues.routine)
        db.drop()


def bare_decode_rate(files: list[Path], repeats: int = 3) -> float:
    """Images per second of ``dcmread(path).pixel_array`` alone on the benchmark's files."""
    import pydicom

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in files:
            _ = pydicom.dcmread(f).pixel_array
        best = min(best, time.perf_counter() - t0)
    return len(files) / best


def bare_forward_rate(files: list[Path], repeats: int = 3) -> dict[str, float]:
    """Images per second of the model's forward pass alone on the benchmark's own tensors."""
    import numpy as np
    import pydicom

    from dicom_io.pixels import to_model_tensor
    from models.registry import get_model

    model = get_model()
    x = np.stack([to_model_tensor(pydicom.dcmread(f), size=model.input_size) for f in files])
    out: dict[str, float] = {"model": model.ref}  # type: ignore[dict-item]
    for bs in (1, 16):
        model.keras_model.predict_on_batch(x[:bs])  # warm-up (graph tracing)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for s in range(0, len(x), bs):
                model.keras_model.predict_on_batch(x[s : s + bs])
            best = min(best, time.perf_counter() - t0)
        out[f"batch{bs}_images_per_s"] = len(x) / best
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.e2e")
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between arrivals in the latency run")
    parser.add_argument("--workers", default="1,2", help="worker process counts to measure")
    parser.add_argument("--backlog", type=int, default=200, help="studies in the throughput backlog")
    parser.add_argument("--shipped-studies", type=int, default=30, help="studies per encoding, shipped configuration")
    parser.add_argument("--only", choices=["shipped", "stack"], help="run one part only")
    args = parser.parse_args(argv or [])
    result: dict[str, Any] = {}
    if args.only != "stack":
        from bench.e2e.shipped import main as shipped

        print("time to a priority with the shipped configuration, per encoding:", flush=True)
        result["shipped"] = shipped(args.shipped_studies)
    if args.only == "shipped":
        return result
    print("PostgreSQL + Redis, 1 and 2 worker processes:", flush=True)
    with tempfile.TemporaryDirectory(prefix="xt-bench-e2e-") as tmp:
        root = Path(tmp)
        files = build_studies(args.studies, root / "studies")
        runs = [run_config(files, int(c), args.interval, root, args.backlog) for c in args.workers.split(",")]
        bare = bare_forward_rate(files)
        bare["decode_images_per_s"] = bare_decode_rate(files)
    result |= {
        "stability_window_s": MIN_STABILITY_WINDOW_S,
        "image": "2500x2048 16-bit DX (MONOCHROME2, explicit VR LE) from Kermany + NIH images",
        "runs": runs,
        "bare_forward": bare,
    }
    print(f"stability window {MIN_STABILITY_WINDOW_S} s (included in every latency); model {bare['model']}")
    slower = min(bare["batch16_images_per_s"], bare["decode_images_per_s"])
    print(f"bare forward pass: {bare['batch1_images_per_s']:.1f} img/s at batch 1, "
          f"{bare['batch16_images_per_s']:.1f} img/s at batch 16; bare decode {bare['decode_images_per_s']:.1f} img/s"
          f" (the slower stage: {slower:.1f} img/s)")  # fmt: skip
    for r in runs:
        ratio1 = r["throughput_studies_per_s"] / bare["batch1_images_per_s"]
        ratio16 = r["throughput_studies_per_s"] / bare["batch16_images_per_s"]
        r["ratio_to_bare_batch1"], r["ratio_to_bare_batch16"] = ratio1, ratio16
        r["ratio_to_slower_stage"] = r["throughput_studies_per_s"] / slower
        r["throughput_goal_met"] = r["ratio_to_slower_stage"] >= 0.75
        print(
            f"{r['worker_processes']} worker process(es): latency p50 {r['latency_p50_s']:.2f} s, "
            f"p95 {r['latency_p95_s']:.2f} s (max {r['latency_max_s']:.2f} s, {r['studies']} studies, one every "
            f"{r['arrival_interval_s']} s); throughput {r['throughput_studies_per_s']:.2f} studies/s = "
            f"{ratio1:.0%} of bare batch-1, {ratio16:.0%} of bare batch-16, {r['ratio_to_slower_stage']:.0%} of the"
            f" slower stage (goal >= 75 %: {'met' if r['throughput_goal_met'] else 'NOT met'});"
            f" backlog {r['backlog_studies']}; states {r['final_states']}"
        )
        print(
            "    p50/p95 per segment: "
            + ", ".join(f"{k} {a:.2f}/{b:.2f}" for k, (a, b) in r["segments_p50_p95_s"].items())
        )
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2, default=str))
