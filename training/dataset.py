"""Pixel cache, balanced batch sampling and the masked loss.

Decoding a 512-px PNG and letterboxing it costs more than a training step at our resolution,
so every image goes through ``dicom_io.pixels.to_model_tensor`` exactly once and the result is
cached as float16 under ``training/cache`` (gitignored).  The cache key includes the pixel
pipeline version, so a change in the pixel path invalidates it instead of silently training
on pixels the worker no longer produces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import keras
import numpy as np

from models.findings import FINDING_NAMES, UNLABELLED, labels_array
from training.readers import Record

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = REPO / "training" / "cache"


def pixel_tensor(source: Any, size: int) -> np.ndarray:
    """The one pixel path (shared with the worker); imported lazily so readers work without it."""
    from dicom_io.pixels import to_model_tensor

    return to_model_tensor(source, size=size)


def pipeline_version() -> str:
    from dicom_io.pixels import PIPELINE_VERSION

    return str(PIPELINE_VERSION)


def _cache_key(paths: Sequence[Path], size: int) -> str:
    h = hashlib.sha256()
    h.update(f"{pipeline_version()}|{size}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"|{p}|{st.st_size}".encode())
    return h.hexdigest()[:20]


def load_tensors(
    records: Sequence[Record],
    size: int = 224,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(n, size, size, 1) float16 tensors for ``records``, read from or written to the cache."""
    paths = [Path(r.path) for r in records]
    cache_file: Path | None = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_file = cache_dir / f"pixels-{_cache_key(paths, size)}.npy"
        if cache_file.exists():
            arr = np.load(cache_file, mmap_mode="r")
            if arr.shape == (len(paths), size, size, 1):
                return np.asarray(arr)
    out = np.empty((len(paths), size, size, 1), dtype=np.float16)

    def work(i: int) -> None:
        out[i] = pixel_tensor(paths[i], size).astype(np.float16)

    n_workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(n_workers) as pool:
        it = pool.map(work, range(len(paths)))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(paths), desc=f"pixel path ({size}px)", mininterval=5, unit="img")
        for _ in it:
            pass
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, cache_file)
        (cache_file.with_suffix(".json")).write_text(
            json.dumps({"pipeline_version": pipeline_version(), "size": size, "paths": [str(p) for p in paths]})
        )
    return out


def record_labels(records: Sequence[Record]) -> np.ndarray:
    return labels_array([r.labels for r in records])


class BalancedBatches(keras.utils.PyDataset):
    """Batches drawn with replacement so that every batch mixes adult and paediatric images.

    Adult labelled images are ~10% of what we have, yet adults are most of what the worker will
    see; a fixed adult share per batch stops the paediatric set from dominating every gradient.
    Each epoch's draw is a pure function of (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        groups: Sequence[str],
        batch_size: int = 32,
        steps: int = 100,
        group_fractions: dict[str, float] | None = None,
        seed: int = 0,
        transform: BatchTransform | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.transform = transform
        self.x, self.y = x, y.astype("float32")
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        groups_arr = np.asarray(groups)
        names = sorted(set(groups_arr.tolist()))
        fractions = group_fractions or {g: 1.0 / len(names) for g in names}
        present = {g: f for g, f in fractions.items() if g in names and f > 0}
        total = sum(present.values())
        self.pools = {g: np.flatnonzero(groups_arr == g) for g in present}
        self.fractions = {g: f / total for g, f in present.items()}
        self.epoch = 0
        self._order = self._draw(0)

    def sample_weights(self) -> np.ndarray:
        """Expected draws per image per batch (for class weights under this sampling)."""
        w = np.zeros(len(self.y), dtype="float64")
        for g, idx in self.pools.items():
            w[idx] = self.fractions[g] / max(1, len(idx))
        return w

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        n = self.batch_size * self.steps
        groups = list(self.pools)
        which = rng.choice(len(groups), size=n, p=[self.fractions[g] for g in groups])
        order = np.empty(n, dtype=np.int64)
        for gi, g in enumerate(groups):
            sel = which == gi
            order[sel] = rng.choice(self.pools[g], size=int(sel.sum()), replace=True)
        return order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = self._draw(epoch)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[np.ndarray, Any]:
        idx = np.sort(self._order[i * self.batch_size : (i + 1) * self.batch_size])
        x, y = self.x[idx].astype("float32"), self.y[idx].copy()
        if self.transform is None:
            return x, y
        # (seed, epoch, step): a resumed run redraws exactly the same augmented batch
        x, y, maps = self.transform(x, y, idx, np.random.default_rng([self.seed, self.epoch, i, 1]))
        return (x, y) if maps is None else (x, (y, maps))

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)


BatchTransform = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray | None]
]


class TrainingTransform:
    """What a training batch goes through on the CPU: synthetic nodules, acquisition, geometry.

    Synthetic nodules go into adult films labelled mass-negative (the RSNA normals most of all)
    and turn that draw into a mass positive; they exist only inside training batches, so no
    synthetic image can reach a validation or test figure.  Lung masks are computed once per
    image, on first draw.

    With ``map_findings`` (the model's dense-map findings) it also returns each batch's map
    targets, (n, cells, cells, 2k): per finding a 0/1 target (the cells a synthetic lesion
    touches, after the geometric jitter) and a weight (1 where the film's label for that
    finding is known *and* so is where the lesion is: synthetic positives, and negatives, whose
    every cell is negative; 0 for real positives, which have no position, and unlabelled films).
    Geometry (``geometry``, an ``AugmentConfig`` with ``geometry: cpu``) runs here then, so
    image and target move together.
    """

    def __init__(
        self,
        x: np.ndarray,
        nodule_eligible: np.ndarray,
        acquisition: Any = None,
        nodules: dict[str, Any] | None = None,
        geometry: Any = None,
        map_findings: Sequence[str] = (),
        map_cells: int | None = None,
    ) -> None:
        self.x = x
        self.eligible = np.asarray(nodule_eligible, dtype=bool)
        self.acquisition = acquisition
        self.geometry = geometry
        self.nodules = dict(nodules or {})
        self.p_nodule = float(self.nodules.pop("probability", 0.0))
        self.map_columns = [FINDING_NAMES.index(f) for f in map_findings]
        if self.map_columns and not map_cells:
            raise ValueError("map_cells is needed with map_findings")
        self.map_cells = int(map_cells or 0)
        self._masks: dict[int, np.ndarray] = {}

    def _mask(self, i: int) -> np.ndarray:
        from training.synthetic_nodules import lung_mask

        if i not in self._masks:
            self._masks[i] = lung_mask(np.asarray(self.x[i, ..., 0], dtype=np.float32))
        return self._masks[i]

    def __call__(
        self, x: np.ndarray, y: np.ndarray, idx: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        mass = FINDING_NAMES.index("mass")
        lesions: dict[int, np.ndarray] = {}
        if self.p_nodule > 0:
            from training.synthetic_nodules import add_synthetic_nodule, nodule_mask

            for k, i in enumerate(idx):
                if self.eligible[i] and y[k, mass] == 0 and rng.random() < self.p_nodule:
                    img, spec = add_synthetic_nodule(x[k, ..., 0], rng, mask=self._mask(int(i)), **self.nodules)
                    if spec is not None:
                        x[k, ..., 0] = img
                        y[k, mass] = 1.0
                        lesions[k] = nodule_mask(spec, img.shape)
        if self.acquisition is not None:
            from training.acquisition import augment_batch

            x = augment_batch(x, self.acquisition, rng)
        if self.geometry is not None:
            from training.geometry import jitter_batch

            x, lesions = jitter_batch(x, self.geometry, rng, lesions)
        return x, y, self._map_targets(y, lesions) if self.map_columns else None

    def _map_targets(self, y: np.ndarray, lesions: dict[int, np.ndarray]) -> np.ndarray:
        from training.geometry import cell_targets

        k = len(self.map_columns)
        out = np.zeros((len(y), self.map_cells, self.map_cells, 2 * k), dtype=np.float32)
        mass = FINDING_NAMES.index("mass")
        for j, col in enumerate(self.map_columns):
            for n in range(len(y)):
                if y[n, col] == 0:
                    out[n, :, :, k + j] = 1.0  # a negative film: every cell is negative
                elif y[n, col] == 1 and col == mass and n in lesions:
                    out[n, :, :, j] = cell_targets(lesions[n], self.map_cells)
                    out[n, :, :, k + j] = 1.0
        return out


def balanced_class_weights(y: np.ndarray, sample_weight: np.ndarray, clip: float = 20.0) -> np.ndarray:
    """(n_findings, 2) weights [neg, pos] that balance each finding under the actual sampling."""
    out = np.ones((y.shape[1], 2), dtype="float32")
    for j in range(y.shape[1]):
        lab = y[:, j] != UNLABELLED
        pos = float(sample_weight[lab & (y[:, j] == 1)].sum())
        neg = float(sample_weight[lab & (y[:, j] == 0)].sum())
        if pos > 0 and neg > 0:
            p = pos / (pos + neg)
            out[j] = np.clip([0.5 / (1 - p), 0.5 / p], 1.0 / clip, clip)
    return out


__all__ = [
    "FINDING_NAMES",
    "BalancedBatches",
    "TrainingTransform",
    "balanced_class_weights",
    "load_tensors",
    "record_labels",
]
