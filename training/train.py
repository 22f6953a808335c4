"""`xray-triage train --config training/configs/<name>.yaml`: seeded, resumable training.

One run folder (``training/runs/<name>``) holds the split CSV, ``last.keras`` (with optimizer
state), ``best.keras``, ``state.json`` and the per-epoch log, so a run killed at epoch 9
restarts at epoch 10 with the same split, the same batches and the same optimizer moments.
At the end the best checkpoint is calibrated on validation (Platt, folded into the final
layer), thresholds are chosen on validation for the target sensitivity, and the model is
exported with its card to the config's ``output`` folder.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from models import metrics as M
from models.architectures import (
    CALIBRATION_LAYER,
    LOGITS_LAYER,
    ArchConfig,
    AugmentConfig,
    build_model,
    inference_model,
)
from models.card import DEFAULT_LIMITATIONS, ModelCard
from models.findings import DEFAULT_TARGET_SENSITIVITY, FINDING_NAMES
from training.collection_metrics import collection_report, steering_evidence
from training.readers import Record, read_dataset, read_shared_data, summarize
from training.splits import apply_split, file_sha256, leaked_patients, patient_split, read_split, write_split

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    """The YAML config, validated; paths are relative to the repository root."""

    name: str
    version: str = "0.1.0"
    seed: int = 20260401
    data: dict[str, Any] = field(default_factory=lambda: {"root": "../shared/data"})
    split: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] | None = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    calibration: str = "platt"
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    run_dir: str | None = None
    output: str | None = None
    cache_dir: str | None = "training/cache"
    # Acquisition augmentation (training.acquisition.AcquisitionConfig keys); None = off.
    acquisition: dict[str, Any] | None = None
    # Synthetic nodules in adult mass-negative training draws: probability, diameter_mm,
    # contrast, spacing_mm (training.synthetic_nodules); None = off.
    synthetic_nodules: dict[str, Any] | None = None
    # Known limitations found by evaluating this model, carried into its card verbatim.
    limitations: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict) or "name" not in data:
            raise ValueError(f"{path}: a training config is a mapping with at least `name`")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)

    def resolve(self, p: str | None, default: str) -> Path:
        path = Path(p or default)
        return path if path.is_absolute() else REPO / path

    @property
    def run_path(self) -> Path:
        return self.resolve(self.run_dir, f"training/runs/{self.name}")

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output, f"models/{self.name}")

    def hp(self, key: str, default: Any) -> Any:
        return self.train.get(key, default)


def load_records(cfg: TrainConfig) -> list[Record]:
    """Every labelled record the config names, optionally limited per source (tiny test runs)."""
    root = cfg.resolve(cfg.data.get("root"), "../shared/data")
    datasets = cfg.data.get("datasets")
    if not datasets:
        records = read_shared_data(root)
    else:
        records = []
        for d in datasets:
            d = dict(d)
            kind, path = d.pop("kind"), Path(d.pop("path"))
            records += read_dataset(kind, path if path.is_absolute() else root / path, **d)
    records = [r for r in records if r.is_labelled]
    limit = cfg.data.get("limit_per_source")
    if limit:
        rng = np.random.default_rng(cfg.seed)
        kept: list[Record] = []
        by_source: dict[str, list[Record]] = {}
        for r in records:
            by_source.setdefault(r.source, []).append(r)
        for src in sorted(by_source):
            rs = by_source[src]
            # keep both classes of the first labelled finding so tiny runs still have AUCs
            rs_sorted = sorted(rs, key=lambda r: (r.labels, str(r.path)))
            pick = rng.permutation(len(rs_sorted))[: int(limit)]
            kept += [rs_sorted[i] for i in sorted(pick)]
        records = kept
    return records


def make_split(cfg: TrainConfig, records: list[Record]) -> tuple[list[Record], Path, str]:
    """Reuse the run's split file when resuming (same patients), else create and write it."""
    split_file = cfg.run_path / "split.csv"
    if split_file.exists():
        return read_split(split_file), split_file, file_sha256(split_file)
    fractions = tuple(cfg.split.get("fractions", (0.7, 0.15, 0.15)))
    seed = int(cfg.split.get("seed", cfg.seed))
    assignment = patient_split(
        records,
        fractions,
        seed,
        honour_given=bool(cfg.split.get("honour_given", False)),
        fractions_by_source=cfg.split.get("fractions_by_source"),
    )
    recs = apply_split(records, assignment)
    if leaked_patients(recs):  # pragma: no cover - patient_split guarantees this
        raise RuntimeError("split leaks patients")
    sha = write_split(recs, split_file)
    # read back: the CSV's order is the canonical one, so a resumed run hits the same pixel cache
    return read_split(split_file), split_file, sha


def batch_groups(records: list[Record], cfg: TrainConfig) -> tuple[list[str], dict[str, float]]:
    """Which pool each training image is drawn from, and each pool's share of a batch.

    ``train.source_fractions`` gives every collection its own share, so the 6,000 RSNA
    normals cannot crowd the adult positives out of a batch and every collection contributes
    both classes where it has them; sources it does not name share ``train.other_fraction``.
    Without it, batches mix adult and paediatric images at ``train.adult_fraction``.
    """
    by_source = cfg.hp("source_fractions", None)
    if by_source:
        present = {r.source for r in records}
        named = {s: float(f) for s, f in by_source.items() if s in present}
        groups = [r.source if r.source in named else "other" for r in records]
        if "other" in groups:
            named["other"] = float(cfg.hp("other_fraction", 0.05))
        return groups, named
    adult_fraction = float(cfg.hp("adult_fraction", 0.4))
    groups = ["paediatric" if r.population == "paediatric" else "adult" for r in records]
    return groups, {"adult": adult_fraction, "paediatric": 1.0 - adult_fraction}


def set_determinism(seed: int) -> None:
    """Same seed, same run: Python, numpy and backend RNGs, and TF's deterministic kernels."""
    import keras

    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.experimental.enable_op_determinism()
        except Exception:  # noqa: BLE001 - older TF: determinism is best effort
            log.warning("TF op determinism not available")


def _split_counts(recs: list[Record]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in ("train", "val", "test"):
        rs = [r for r in recs if r.given_split == s]
        out[s] = {"images": len(rs), "patients": len({r.patient_id for r in rs})}
    return out


class EpochLogger:
    """Per-epoch validation AUCs, checkpoints, early stopping and the epoch log (resumable)."""

    def __init__(
        self,
        run: Path,
        x_val: np.ndarray,
        y_val: np.ndarray,
        patience: int,
        state: dict[str, Any],
        val_sources: Sequence[str] | None = None,
    ) -> None:
        self.run, self.x_val, self.y_val, self.patience = run, x_val, y_val, patience
        self.t0 = time.perf_counter()  # reset when each fit starts
        self.state = state
        # Checkpoints are chosen on AUCs within one collection when sources are given: a pooled
        # AUC keeps rising while the model learns to tell collections apart.
        self.val_sources = None if val_sources is None else np.asarray(val_sources)
        self.bar: Any = None

    def callback(self, steps: int, epochs: int) -> Any:
        import keras
        from tqdm import tqdm

        outer = self

        class _CB(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                outer.t0 = time.perf_counter()
                outer.bar = tqdm(
                    total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", mininterval=10, file=sys.stderr
                )

            def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                if outer.bar is not None:
                    outer.bar.update(1)
                    if logs and "loss" in logs:
                        outer.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                if outer.bar is not None:
                    outer.bar.close()
                outer.end_epoch(self.model, epoch, dict(logs or {}))

        return _CB()

    def end_epoch(self, model: Any, epoch: int, logs: dict[str, Any]) -> None:
        p = predict_array(model, self.x_val)
        aucs = {}
        for j, name in enumerate(FINDING_NAMES):
            y, s = M.labelled(self.y_val[:, j], p[:, j])
            aucs[name] = M.safe_auc(y, s)
        within = within_source_aucs(self.y_val, p, self.val_sources) if self.val_sources is not None else {}
        present = list(within.values()) or [a for a in aucs.values() if a is not None]
        score = float(np.mean(present)) if present else -float(logs.get("loss", 0.0))
        row = {
            "epoch": epoch + 1,
            "loss": float(logs.get("loss", float("nan"))),
            **{f"val_auc_{k}": v for k, v in aucs.items()},
            **{f"val_within_{k}": v for k, v in within.items()},
            "val_mean_auc": score,
            "lr": _current_lr(model),
            "seconds": round(time.perf_counter() - self.t0, 1),
        }
        improved = score > self.state.get("best", -np.inf)
        if improved:
            self.state.update(best=score, best_epoch=epoch + 1, wait=0)
            model.save(self.run / "best.keras")
        else:
            self.state["wait"] = self.state.get("wait", 0) + 1
        self.state["epoch"] = epoch + 1
        # wall time of training epochs (incl. validation), summed over resumed sessions
        self.state["fit_seconds"] = float(self.state.get("fit_seconds", 0.0)) + time.perf_counter() - self.t0
        model.save(self.run / "last.keras")
        (self.run / "state.json").write_text(json.dumps(self.state, indent=2))
        _append_history(self.run / "history.csv", row)
        msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"[epoch] {msg}{' *best*' if improved else ''}", file=sys.stderr, flush=True)
        if self.state["wait"] >= self.patience:
            print(f"[early stop] no improvement for {self.patience} epochs", file=sys.stderr, flush=True)
            model.stop_training = True


def within_source_aucs(y: np.ndarray, p: np.ndarray, sources: np.ndarray, min_per_class: int = 10) -> dict[str, float]:
    """AUC per (source, finding) where that source alone has both classes: figures a model
    cannot win by recognising collections."""
    out: dict[str, float] = {}
    for src in sorted(set(sources.tolist())):
        sel = sources == src
        for j, name in enumerate(FINDING_NAMES):
            yy, ss = M.labelled(y[sel, j], p[sel, j])
            if min(int((yy == 1).sum()), int((yy == 0).sum())) >= min_per_class:
                auc = M.safe_auc(yy, ss)
                if auc is not None:
                    out[f"{src}/{name}"] = auc
    return out


def _current_lr(model: Any) -> float:
    try:
        import keras

        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except Exception:  # noqa: BLE001 - the log line must never stop training
        return float("nan")


def _append_history(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def score_reference(p: np.ndarray, populations: list[str]) -> dict[str, dict[str, list[int]]]:
    """The card's validation score distributions per population and finding (drift reference)."""
    pops = np.asarray(populations)
    return {
        pop: {n: M.score_histogram(p[pops == pop, j]) for j, n in enumerate(FINDING_NAMES)}
        for pop in sorted(set(populations))
    }


def predict_array(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    out = []
    for s in range(0, len(x), batch_size):
        pred = model.predict_on_batch(x[s : s + batch_size].astype("float32"))
        out.append(np.asarray(pred[0] if isinstance(pred, (list, tuple)) else pred))  # scores come first
    return np.concatenate(out).astype("float32") if out else np.zeros((0, len(FINDING_NAMES)), "float32")


def population_thresholds(
    y: np.ndarray, p: np.ndarray, pops: Sequence[str], target: float, min_pos: int = 10
) -> dict[str, dict[str, float]]:
    """Operating thresholds per population, each for ``target`` sensitivity on that population's
    validation images: {"adult": {...}, "paediatric": {...}}.

    Adults are the shipped use, so the adult point is the default (files without an age use
    it).  Children's pneumonia films look different (and their normals differ too), so one
    pooled threshold misjudges both; a finding with fewer than ``min_pos`` positives in a
    population falls back to the pooled threshold rather than to a guess from a handful.
    """
    pa = np.asarray(pops)
    out: dict[str, dict[str, float]] = {"adult": {}, "paediatric": {}}
    for j, n in enumerate(FINDING_NAMES):
        y_all, s_all = M.labelled(y[:, j], p[:, j])
        pooled = M.threshold_for_sensitivity(y_all, s_all, target) if len(y_all) else 0.5
        for pop, th in out.items():
            yy, ss = M.labelled(y[pa == pop, j], p[pa == pop, j])
            th[n] = M.threshold_for_sensitivity(yy, ss, target) if int((yy == 1).sum()) >= min_pos else pooled
    return out


def merge_comparisons(report: dict[str, Any], held: dict[str, Any], held_out: list[str]) -> dict[str, Any]:
    """The test report's comparisons, with those of held-out collections taken from ``held``."""
    mine = [c for c in report.get("comparisons", []) if c.get("source") not in held_out]
    theirs = [c for c in held.get("comparisons", []) if c.get("source") in held_out]
    return {**report, "comparisons": [*theirs, *mine]}


def steering_limitations(card: ModelCard) -> list[str]:
    """The card says, per operating point, which findings steer a worklist under the default
    triage policy and why not the others (the rule itself is the triage package's)."""
    from settings import Settings
    from triage.operating import steering_reasons

    return [
        f"Triage, {pop} operating point, {f}: {why} (default policy, docs/triage.md)."
        for pop, reasons in steering_reasons(card, Settings()).items()
        for f, why in reasons.items()
    ]


def fold_platt(model: Any, params: list[tuple[float, float]]) -> None:
    """Put per-finding Platt scaling into the model: into its calibration layer where it has one
    (models with dense finding maps), else folded into the logits layer:
    sigmoid(a*(Wx+b)+c) = sigmoid((aW)x + (ab+c))."""
    a = np.array([p[0] for p in params], dtype="float32")
    c = np.array([p[1] for p in params], dtype="float32")
    try:
        calib = model.get_layer(CALIBRATION_LAYER)
    except ValueError:
        calib = None
    if calib is not None:
        scale, offset = calib.get_weights()
        calib.set_weights([scale * a, offset * a + c])
        return
    dense = model.get_layer(LOGITS_LAYER)
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * a[None, :], bias * a + c])


def evaluate_arrays(
    y: np.ndarray,
    p: np.ndarray,
    thresholds: dict[str, float],
    pops: list[str] | None = None,
    n_boot: int = 1000,
    by_population: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Per finding metrics, overall and by population (adult / paediatric); each population is
    judged at its own operating point when ``by_population`` has one."""
    overall = {
        n: M.finding_metrics(y[:, j], p[:, j], thresholds[n], n_boot=n_boot) for j, n in enumerate(FINDING_NAMES)
    }
    out: dict[str, Any] = {"overall": overall, "by_population": {}}
    if pops is not None:
        pa = np.asarray(pops)
        for pop in sorted(set(pops)):
            sel = pa == pop
            th = {**thresholds, **(by_population or {}).get(pop, {})}
            out["by_population"][pop] = {
                n: M.finding_metrics(y[sel, j], p[sel, j], th[n], n_boot=n_boot) for j, n in enumerate(FINDING_NAMES)
            }
    return out


def train(config: str | Path | TrainConfig, resume: bool = True, progress: bool = True) -> Path:
    """Train, calibrate, choose thresholds, export; return the exported model file."""
    import keras

    from models.losses import MaskedBinaryCrossentropy, MaskedMapLoss
    from training.acquisition import AcquisitionConfig
    from training.dataset import (
        BalancedBatches,
        TrainingTransform,
        balanced_class_weights,
        load_tensors,
        pipeline_version,
        record_labels,
    )

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.load(config)
    run = cfg.run_path
    if not resume and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    set_determinism(cfg.seed)
    t_start = time.time()

    records = load_records(cfg)
    recs, split_file, split_sha = make_split(cfg, records)
    arch = ArchConfig.from_dict(cfg.model)
    cache = cfg.resolve(cfg.cache_dir, "training/cache") if cfg.cache_dir else None
    x_all = load_tensors(recs, arch.input_size, cache_dir=cache, progress=progress)
    y_all = record_labels(recs)
    split_arr = np.array([r.given_split for r in recs])
    tr, va, te = (np.flatnonzero(split_arr == s) for s in ("train", "val", "test"))
    only = cfg.hp("train_sources", None)  # ablations: train on some sources, validate on the full split
    if only:
        tr = tr[np.isin(np.array([recs[i].source for i in tr]), list(only))]
    pops = [r.population for r in recs]
    log.info("records: train %d, val %d, test %d", len(tr), len(va), len(te))

    bs = int(cfg.hp("batch_size", 32))
    steps = int(cfg.hp("steps_per_epoch", max(1, len(tr) // bs)))
    epochs = int(cfg.hp("epochs", 20))
    groups, fractions = batch_groups([recs[i] for i in tr], cfg)
    augment = AugmentConfig.from_dict(cfg.augment)
    if arch.map_findings and (augment is None or augment.geometry != "cpu"):
        raise ValueError("model.map_findings needs augment.geometry: cpu (in-graph jitter would misplace map targets)")
    transform = TrainingTransform(
        x_all[tr],
        nodule_eligible=np.array([pops[i] == "adult" for i in tr]),
        acquisition=AcquisitionConfig.from_dict(cfg.acquisition),
        nodules=cfg.synthetic_nodules,
        geometry=augment if augment is not None and augment.geometry == "cpu" else None,
        map_findings=arch.map_findings,
        map_cells=arch.map_size,
    )
    seq = BalancedBatches(x_all[tr], y_all[tr], groups, bs, steps, fractions, seed=cfg.seed, transform=transform)
    weighting = cfg.hp("class_weighting", "balanced")
    cw = balanced_class_weights(y_all[tr], seq.sample_weights()) if weighting not in (None, "none") else None

    state_file = run / "state.json"
    state: dict[str, Any] = json.loads(state_file.read_text()) if (resume and state_file.exists()) else {}
    start_epoch = int(state.get("epoch", 0))
    if start_epoch and (run / "last.keras").exists():
        print(f"resuming {cfg.name} from epoch {start_epoch}", file=sys.stderr, flush=True)
        model = keras.saving.load_model(run / "last.keras")
    else:
        start_epoch, state = 0, {}
        (run / "history.csv").unlink(missing_ok=True)
        model = build_model(arch, augment, seed=cfg.seed, name=cfg.name)
        lr = float(cfg.hp("learning_rate", 1e-3))
        total = epochs * steps
        warm = min(steps, total // 10)
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=lr * 0.05,
            decay_steps=max(1, total - warm),
            alpha=0.02,
            warmup_target=lr,
            warmup_steps=warm,
        )
        opt = keras.optimizers.AdamW(
            learning_rate=schedule, weight_decay=float(cfg.hp("weight_decay", 1e-4)), clipnorm=1.0
        )
        loss = MaskedBinaryCrossentropy(None if cw is None else cw.tolist())
        if arch.map_findings:
            weight = float(cfg.hp("map_loss_weight", 1.0))
            model.compile(optimizer=opt, loss=[loss, MaskedMapLoss()], loss_weights=[1.0, weight])
        else:
            model.compile(optimizer=opt, loss=loss)
    seq.set_epoch(start_epoch)

    sel_va = va
    if only:  # a held-out collection must not choose the checkpoint either
        sel_va = va[np.isin(np.array([recs[i].source for i in va]), list(only))]
    val_sources = [recs[i].source for i in sel_va] if cfg.hp("selection", "pooled") == "within_source" else None
    logger = EpochLogger(run, x_all[sel_va], y_all[sel_va], int(cfg.hp("patience", 6)), state, val_sources)
    if start_epoch < epochs and state.get("wait", 0) < logger.patience:
        model.fit(seq, epochs=epochs, initial_epoch=start_epoch, verbose=0, callbacks=[logger.callback(steps, epochs)])
    train_seconds = float(state.get("fit_seconds", state.get("seconds_before_resume", time.time() - t_start)))
    state_file.write_text(json.dumps(state, indent=2))

    # --- calibrate, threshold, export ------------------------------------------------------
    best = inference_model(keras.saving.load_model(run / "best.keras", compile=False))
    # Calibration and thresholds are fitted on all of validation, a held-out collection's
    # validation films included: they are the only real positives some findings have (mass, when
    # NIH is held out), and a threshold must be set on the kind of film it will judge.  The
    # held-out collection's other films stay untouched (below).
    p_val = predict_array(best, x_all[va])
    platt = []
    for j in range(len(FINDING_NAMES)):
        y, s = M.labelled(y_all[va, j], p_val[:, j])
        platt.append(M.fit_platt(y, s) if cfg.calibration == "platt" else (1.0, 0.0))
    fold_platt(best, platt)
    p_val = predict_array(best, x_all[va])
    p_test = predict_array(best, x_all[te]) if len(te) else np.zeros((0, len(FINDING_NAMES)), "float32")
    by_population = population_thresholds(y_all[va], p_val, [pops[i] for i in va], cfg.target_sensitivity)
    thresholds = by_population.pop("adult")
    n_boot = int(cfg.hp("bootstrap", 1000))
    pop_va, pop_te = [pops[i] for i in va], [pops[i] for i in te]
    val_metrics = evaluate_arrays(y_all[va], p_val, thresholds, pop_va, n_boot, by_population)
    test_metrics = evaluate_arrays(y_all[te], p_test, thresholds, pop_te, n_boot, by_population) if len(te) else {}
    # Read first in the card: figures within one collection, the RSNA normals on their own, the leak check.
    ops = {"adult": thresholds, **{k: {**thresholds, **v} for k, v in by_population.items()}}
    val_metrics["collections"] = collection_report([recs[i] for i in va], p_val, ops, n_boot=n_boot)
    if len(te):
        test_metrics["collections"] = collection_report([recs[i] for i in te], p_test, ops, n_boot=n_boot)
    # A collection held out of training is judged on all of its films outside validation: never
    # trained on, never used to choose anything, the largest such sample there is, and what
    # steering is decided on.
    evidence_report = test_metrics.get("collections") or val_metrics["collections"]
    held_out = sorted({r.source for r in recs} - set(only)) if only else []
    if held_out:
        outside_val = split_arr != "val"
        hold = np.flatnonzero(np.isin(np.array([r.source for r in recs]), held_out) & outside_val)
        p_hold = predict_array(best, x_all[hold])
        held_report = collection_report([recs[i] for i in hold], p_hold, ops, n_boot=n_boot)
        test_metrics["held_out"] = {"sources": held_out, "n_images": len(hold), "collections": held_report}
        evidence_report = merge_comparisons(evidence_report, held_report, held_out)
    normals_te = [i for i in te if recs[i].source == "rsna-normals"][: int(cfg.hp("localisation_images", 300))]
    if normals_te and cfg.synthetic_nodules:
        from models.gradcam import gradcam
        from training.localisation import synthetic_localisation

        shape = {k: v for k, v in cfg.synthetic_nodules.items() if k != "probability"}
        test_metrics["synthetic_nodules"] = synthetic_localisation(
            lambda b: gradcam(best, b), x_all[normals_te], seed=cfg.seed, n_boot=n_boot, **shape
        )

    out = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / "model.keras"
    best.save(model_file)
    shutil.copyfile(split_file, out / "split.csv")
    if (run / "history.csv").exists():
        shutil.copyfile(run / "history.csv", out / "history.csv")
    summary = summarize([r for r in recs if r.given_split == "train"])
    limitations = list(DEFAULT_LIMITATIONS) + list(cfg.limitations)
    for n in FINDING_NAMES:
        op = val_metrics["overall"][n].get("operating_point") or {}
        spec = op.get("specificity")
        if spec is not None and spec < 0.5:
            limitations.append(
                f"{n}: at the threshold for sensitivity {cfg.target_sensitivity:.2f} the validation specificity is "
                f"only {spec:.2f}, so the {n} flag is raised for most images and carries little information."
            )
    card = ModelCard(
        limitations=limitations,
        name=cfg.name,
        version=cfg.version,
        architecture=arch.arch,
        input_size=arch.input_size,
        internal_size=arch.internal_size,
        preprocessing_version=pipeline_version(),
        parameters=int(best.count_params()),
        thresholds=thresholds,
        thresholds_by_population=by_population,
        steering_evidence=steering_evidence(evidence_report),
        target_sensitivity=cfg.target_sensitivity,
        calibration={
            "method": cfg.calibration,
            "fitted_on": "val",
            "params": {n: {"a": a, "b": b} for n, (a, b) in zip(FINDING_NAMES, platt, strict=True)},
        },
        training_data=[
            {"source": s, **v, "labels": ", ".join(f"{k}={c}" for k, c in v.items() if k not in {"images", "patients"})}
            for s, v in sorted(summary.items())
        ],
        split={
            "file": "split.csv",
            "sha256": split_sha,
            "seed": int(cfg.split.get("seed", cfg.seed)),
            "fractions": list(cfg.split.get("fractions", (0.7, 0.15, 0.15))),
            "counts": _split_counts(recs),
        },
        training={
            "config": asdict(cfg),
            "class_weights": None
            if cw is None
            else {n: {"neg": float(w[0]), "pos": float(w[1])} for n, w in zip(FINDING_NAMES, cw, strict=True)},
            "epochs_run": int(state.get("epoch", 0)),
            "best_epoch": int(state.get("best_epoch", 0)),
            "best_val_mean_auc_uncalibrated": state.get("best"),
            "wall_time_s": round(train_seconds, 1),
            "host": f"{os.cpu_count()} CPU cores, keras {keras.__version__} ({keras.backend.backend()})",
            "population_counts_train": dict(Counter(pops[i] for i in tr)),
        },
        validation_metrics=val_metrics,
        score_reference=score_reference(p_val, [pops[i] for i in va]),
        test_metrics=test_metrics,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    card.limitations += steering_limitations(card)
    card.save(out)
    print(
        f"exported {model_file} ({model_file.stat().st_size / 1e6:.1f} MB) in {train_seconds / 60:.1f} min",
        file=sys.stderr,
        flush=True,
    )
    return model_file
