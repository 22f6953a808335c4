"""Inference speed of the default model on CPU: our scoring path vs the bare Keras forward pass.

Measured in the same run, at batch 1 and batch 16:

* ``end_to_end``: the scoring service (``triage.service.Scorer.judge``) on real files
  (eligibility, pixel path from DICOM/PNG/JPEG, model, thresholds, flags): what ``predict``
  pays per image (the worker also computes heatmaps);
* ``score_tensors``: ``TriageModel.score_tensors`` on ready pixel-path tensors (our wrapper);
* ``bare_keras``: ``model.predict_on_batch`` on random input of the same shape (the baseline;
  random input is fine here, it is a speed measurement of the graph only).

The difference between end_to_end and bare_keras is our overhead.  Also reported: the
parameter count and the ``.keras`` file size.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XRAY_TRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _files(n: int) -> list[Path]:
    """Real images of every kind the worker meets: a DICOM, adult PNGs, paediatric JPEGs."""
    dicom = sorted((SHARED / "dicom").glob("siim*.dcm"))
    pngs = sorted((SHARED / "nih-findings" / "images").glob("*.png"))[: n // 2]
    jpegs = sorted((SHARED / "kermany" / "train" / "NORMAL").glob("*.jpeg"))[:n]
    files = (dicom + pngs + jpegs)[:n]
    if len(files) < n:
        raise SystemExit(f"bench/infer needs the real data in {SHARED}")
    return files


def _rate(fn, n_images: int, repeats: int) -> dict[str, float]:
    fn()  # warm-up: graph tracing, allocator
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"images_per_s": round(n_images / med, 2), "ms_per_batch": round(1000 * med, 2)}


def main() -> dict:
    from dicom_io.pixels import to_model_tensor
    from models.registry import TriageModel
    from settings import Settings
    from triage.service import ImageInput, Scorer

    model = TriageModel.load()
    scorer = Scorer(model, Settings())
    km = model.keras_model
    size = model.input_size
    files = _files(16)
    tensors = np.stack([to_model_tensor(f, size=size) for f in files]).astype("float32")
    rng = np.random.default_rng(0)
    result: dict = {
        "model": model.ref,
        "parameters": int(km.count_params()),
        "file_size_mb": round(Path(model.path).stat().st_size / 1e6, 2),
        "cpu_cores": os.cpu_count(),
        "batches": {},
    }
    for bs in (1, 16):
        rand = rng.random((bs, size, size, 1), dtype=np.float32)
        batch_files = files[:bs]
        batch_tensors = tensors[:bs]
        repeats = 20 if bs == 1 else 6
        r = {
            "bare_keras": _rate(lambda rand=rand: km.predict_on_batch(rand), bs, repeats),
            "score_tensors": _rate(lambda t=batch_tensors, bs=bs: model.score_tensors(t, batch_size=bs), bs, repeats),
            "end_to_end": _rate(
                lambda f=batch_files, bs=bs: scorer.judge([ImageInput(str(p), p) for p in f], batch_size=bs),
                bs,
                max(3, repeats // 2),
            ),
        }
        bare = r["bare_keras"]["ms_per_batch"]
        r["overhead_ms_per_image"] = round((r["end_to_end"]["ms_per_batch"] - bare) / bs, 2)
        r["wrapper_overhead_ms_per_image"] = round((r["score_tensors"]["ms_per_batch"] - bare) / bs, 2)
        result["batches"][str(bs)] = r
        print(
            f"batch {bs:>2}: bare Keras {r['bare_keras']['images_per_s']:>7} img/s | score_tensors "
            f"{r['score_tensors']['images_per_s']:>7} img/s | end-to-end (files) {r['end_to_end']['images_per_s']:>7} "
            f"img/s | our overhead {r['overhead_ms_per_image']} ms/img",
            flush=True,
        )
    print(f"{result['model']}: {result['parameters']:,} parameters, {result['file_size_mb']} MB", flush=True)
    return result


if __name__ == "__main__":
    main()
