"""`xray-triage evaluate --model M --data D [--finding F]`: a self-contained report folder.

Images are read through the serving pixel path (no training cache), scored by the saved
model as the worker would, and judged at the thresholds stored in the model card.  The
report names the exact split file (by SHA-256) it was computed on.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models.card import ModelCard, metrics_table
from models.card_sections import render_collection_report
from models.findings import DISCLAIMER, FINDING_NAMES
from training.collection_metrics import collection_report, operating_points_from_card
from training.readers import (
    Record,
    read_covid_metadata,
    read_folder_per_class,
    read_labels_csv,
    read_nih_csv,
    read_shared_data,
)
from training.splits import file_sha256, read_split

# Split names that stand for several given splits: "holdout" is every image not trained on,
# which roughly doubles the small NIH within-collection sets (a dozen or so pneumonia positives in each split).
SPLIT_GROUPS: dict[str, frozenset[str]] = {"holdout": frozenset({"val", "test"})}


def _in_split(record: Record, split: str) -> bool:
    return record.given_split in SPLIT_GROUPS.get(split, frozenset({split}))


def read_data(data: str | Path, split: str | None = "val") -> tuple[list[Record], dict[str, Any]]:
    """Records from a split CSV (one split of it, or "holdout" = val+test), a dataset folder or the shared root."""
    d = Path(data)
    info: dict[str, Any] = {"data": str(d)}
    if d.is_file() and d.suffix == ".csv":
        recs = read_split(d)
        info["split_file_sha256"] = file_sha256(d)
        if split and split != "all":
            recs = [r for r in recs if _in_split(r, split)]
            info["split"] = split
    elif (d / "kermany").is_dir() and (d / "nih-findings").is_dir():
        recs = read_shared_data(d)
    elif (d / "metadata.csv").exists():
        recs = read_covid_metadata(d)
    elif (d / "labels.csv").exists():
        header = (d / "labels.csv").read_text(encoding="utf-8").splitlines()[0]
        recs = read_nih_csv(d) if "Finding Labels" in header else read_labels_csv(d)
    elif d.is_dir():
        recs = read_folder_per_class(d, source=d.name)
        if split and split != "all" and any(r.given_split for r in recs):
            recs = [r for r in recs if _in_split(r, split)]
            info["split"] = split
    else:
        raise FileNotFoundError(f"no data at {d}")
    recs = [r for r in recs if r.is_labelled]
    if not recs:
        raise ValueError(f"no labelled images in {d}" + (f" (split {split})" if split else ""))
    return recs, info


def _pick_examples(y: np.ndarray, p: np.ndarray, thresholds: dict[str, float], k: int = 12) -> list[tuple[int, str]]:
    """A few true/false positives/negatives per finding, so the grid shows failures as well as successes."""
    picks: list[tuple[int, str]] = []
    rng = np.random.default_rng(0)
    per = max(1, k // (2 * len(FINDING_NAMES)))
    for j, n in enumerate(FINDING_NAMES):
        lab = y[:, j]
        pred = p[:, j] >= thresholds.get(n, 0.5)
        for cond, tag in (((lab == 1) & pred, "TP"), ((lab == 1) & ~pred, "FN"), ((lab == 0) & pred, "FP")):
            idx = np.flatnonzero(cond)
            for i in rng.permutation(idx)[:per]:
                if all(i != q for q, _ in picks):
                    picks.append((int(i), f"{n} {tag}"))
    return picks[:k]


def score_records(model: Any, recs: list[Record], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-path tensors and the model's probabilities, batch by batch."""
    from training.dataset import load_tensors

    x = load_tensors(recs, model.input_size, cache_dir=None, progress=len(recs) > 200)
    p = model.predict_tensors(x.astype("float32"), batch_size=batch_size)
    return x, p


def evaluate(
    model_path: str | Path,
    data: str | Path,
    out_dir: str | Path | None = None,
    finding: str | None = None,
    split: str | None = "val",
    compare: str | Path | None = None,
    n_boot: int = 1000,
    n_examples: int = 12,
) -> Path:
    from models import plots
    from models.registry import TriageModel
    from training.train import evaluate_arrays

    model = TriageModel.load(model_path)
    recs, info = read_data(data, split)
    out = Path(out_dir) if out_dir else Path(model.path or model_path).parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    names = [finding] if finding else list(FINDING_NAMES)
    cols = [FINDING_NAMES.index(n) for n in names]

    x, p = score_records(model, recs)
    y = np.array([r.labels for r in recs], dtype=np.int8)
    thresholds = {n: model.threshold(n) for n in FINDING_NAMES}
    pops = [r.population for r in recs]
    res = evaluate_arrays(y, p, thresholds, pops, n_boot=n_boot, by_population=model.card.thresholds_by_population)
    sources = sorted({r.source for r in recs})
    by_source = {}
    for s in sources:
        sel = np.array([r.source == s for r in recs])
        by_source[s] = evaluate_arrays(y[sel], p[sel], thresholds, None, n_boot=min(n_boot, 200))["overall"]

    # Within-collection figures at every operating point the card defines (adult plus per population).
    operating_points = operating_points_from_card(model.card, thresholds)
    collections = collection_report(recs, p, operating_points, n_boot=n_boot)

    def keep(d: dict[str, Any]) -> dict[str, Any]:
        return {n: d[n] for n in names if n in d}

    result: dict[str, Any] = {
        "model": model.ref,
        "model_file": str(model.path),
        "disclaimer": DISCLAIMER,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **info,
        "n_images": len(recs),
        "n_patients": len({r.patient_id for r in recs}),
        "thresholds": {n: thresholds[n] for n in names},
        "target_sensitivity": model.card.target_sensitivity,
        "findings": keep(res["overall"]),
        "by_population": {k: keep(v) for k, v in res["by_population"].items()},
        "by_source": {k: keep(v) for k, v in by_source.items()},
        "collections": collections,
    }
    if compare:
        other = TriageModel.load(compare)
        _, p2 = score_records(other, recs)
        th2 = {n: other.threshold(n) for n in FINDING_NAMES}
        r2 = evaluate_arrays(y, p2, th2, pops, n_boot=n_boot, by_population=other.card.thresholds_by_population)
        result["comparison"] = {
            "model": other.ref,
            "findings": keep(r2["overall"]),
            "by_population": {k: keep(v) for k, v in r2["by_population"].items()},
        }
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n")

    ys, ps = y[:, cols], p[:, cols]
    figs: dict[str, Path | None] = {
        "ROC curves": plots.plot_roc(ys, ps, names, result["findings"], out / "roc.png"),
        "Precision-recall": plots.plot_pr(ys, ps, names, out / "pr.png"),
        "Confusion matrices at the operating threshold": plots.plot_confusion(
            result["findings"], names, out / "confusion.png"
        ),
        "Confidence histograms per true class": plots.plot_confidence(
            ys, ps, names, thresholds, out / "confidence.png"
        ),
        "Calibration curves": plots.plot_calibration(ys, ps, names, out / "calibration.png"),
        "Training history": plots.plot_history(
            Path(model.path or model_path).parent / "history.csv", out / "history.png"
        ),
    }
    picks = _pick_examples(y, p, thresholds, n_examples)
    if picks:
        idx = [i for i, _ in picks]
        maps, _ = model.heatmaps(x[idx].astype("float32"))
        sel_maps = np.stack([maps[k, FINDING_NAMES.index(tag.split()[0])] for k, (_, tag) in enumerate(picks)])
        titles = [
            f"{tag}: {p[i, FINDING_NAMES.index(tag.split()[0])]:.2f}\n{recs[i].source} {recs[i].raw_label[:28]}"
            for i, tag in picks
        ]
        figs["Example predictions with Grad-CAM heatmaps"] = plots.plot_examples(
            x[idx], sel_maps, titles, out / "examples.png"
        )
    (out / "report.md").write_text(render_report(result, figs, model.card), encoding="utf-8")
    print(f"report written to {out}", file=sys.stderr)
    return out


def render_report(result: dict[str, Any], figs: dict[str, Path | None], card: ModelCard) -> str:
    lines = [
        f"# Evaluation report: {result['model']}",
        "",
        f"**{DISCLAIMER}**",
        "",
        f"- Data: `{result['data']}`" + (f", split `{result['split']}`" if result.get("split") else ""),
    ]
    if result.get("split_file_sha256"):
        lines.append(f"- Split file SHA-256: `{result['split_file_sha256']}`")
    lines += [
        f"- {result['n_images']} images of {result['n_patients']} patients; created {result['created']}",
        f"- Operating thresholds from the model card (chosen on validation for sensitivity >= "
        f"{result['target_sensitivity']:.2f}): " + ", ".join(f"{k} {v:.3f}" for k, v in result["thresholds"].items()),
        "- AUC intervals: 95% stratified bootstrap. Small positive counts (COVID-19, mass) give wide intervals.",
        "",
    ]
    if result.get("collections"):
        lines += [*render_collection_report(result["collections"]), ""]
    lines += [
        "## Pooled metrics (all collections together)",
        "",
        "These figures mix collections, and a model can score well on them by telling the collections apart "
        "rather than by seeing disease: read them after the within-collection figures above.",
        "",
        *metrics_table(result["findings"]),
    ]
    for pop, m in result.get("by_population", {}).items():
        lines += ["", f"### {pop} images only", "", *metrics_table(m)]
    for src, m in result.get("by_source", {}).items():
        lines += ["", f"### source: {src}", "", *metrics_table(m)]
    if "comparison" in result:
        c = result["comparison"]
        lines += ["", f"## Comparison: {c['model']} on the same images", "", *metrics_table(c["findings"])]
        for pop, m in c.get("by_population", {}).items():
            lines += ["", f"### {c['model']}: {pop} images only", "", *metrics_table(m)]
    lines += ["", "## Figures", ""]
    for title, path in figs.items():
        if path is not None:
            lines += [f"### {title}", "", f"![{title}]({Path(path).name})", ""]
    lines += ["## Model", "", f"See the model card (`card.md`) of {card.ref}.", "", f"_{DISCLAIMER}_", ""]
    return "\n".join(lines)
