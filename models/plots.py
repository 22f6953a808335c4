"""Report figures (PNG, matplotlib Agg): one function per plot, each taking plain arrays.

Every figure carries the decision-support disclaimer in its footer, because PNGs get copied
into slide decks without the report around them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from models.findings import DISCLAIMER
from models.metrics import calibration_bins, labelled


def _finish(fig: Any, path: Path) -> Path:
    fig.text(0.5, 0.005, DISCLAIMER, ha="center", va="bottom", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(n: int) -> tuple[Any, np.ndarray]:
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), squeeze=False)
    return fig, axes[0]


def plot_roc(y: np.ndarray, p: np.ndarray, names: Sequence[str], metrics: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for j, n in enumerate(names):
        yy, pp = labelled(y[:, j], p[:, j])
        if len(np.unique(yy)) < 2:
            continue
        fpr, tpr, _ = roc_curve(yy, pp)
        m = metrics.get(n, {})
        ci = m.get("auc_ci95")
        label = f"{n}: AUC {m.get('auc', float('nan')):.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")
        ax.plot(fpr, tpr, label=label)
        op = m.get("operating_point") or {}
        if op.get("sensitivity") is not None and op.get("specificity") is not None:
            ax.plot(1 - op["specificity"], op["sensitivity"], "o", color=ax.lines[-1].get_color())
    ax.plot([0, 1], [0, 1], "--", color="0.6", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (dots: operating thresholds)")
    ax.legend(loc="lower right", fontsize=8)
    return _finish(fig, path)


def plot_pr(y: np.ndarray, p: np.ndarray, names: Sequence[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for j, n in enumerate(names):
        yy, pp = labelled(y[:, j], p[:, j])
        if len(np.unique(yy)) < 2:
            continue
        prec, rec, _ = precision_recall_curve(yy, pp)
        ax.plot(rec, prec, label=f"{n} (prevalence {yy.mean():.2f})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _finish(fig, path)


def plot_confusion(metrics: dict[str, Any], names: Sequence[str], path: Path) -> Path:
    fig, axes = _grid(len(names))
    for ax, n in zip(axes, names, strict=True):
        op = (metrics.get(n) or {}).get("operating_point")
        ax.set_title(n)
        if not op:
            ax.text(0.5, 0.5, "not labelled", ha="center")
            ax.axis("off")
            continue
        mat = np.array([[op["tn"], op["fp"]], [op["fn"], op["tp"]]])
        ax.imshow(mat, cmap="Blues")
        for i in range(2):
            for k in range(2):
                ax.text(
                    k,
                    i,
                    str(mat[i, k]),
                    ha="center",
                    va="center",
                    fontsize=13,
                    color="white" if mat[i, k] > mat.max() / 2 else "black",
                )
        ax.set_xticks([0, 1], ["pred neg", "pred pos"])
        ax.set_yticks([0, 1], ["true neg", "true pos"])
        ax.set_xlabel(f"threshold {op['threshold']:.3f}")
    return _finish(fig, path)


def plot_confidence(
    y: np.ndarray, p: np.ndarray, names: Sequence[str], thresholds: dict[str, float], path: Path
) -> Path:
    fig, axes = _grid(len(names))
    bins = np.linspace(0, 1, 26)
    for j, (ax, n) in enumerate(zip(axes, names, strict=True)):
        yy, pp = labelled(y[:, j], p[:, j])
        ax.hist(pp[yy == 0], bins=bins, alpha=0.6, label=f"true negative (n={int((yy == 0).sum())})")
        ax.hist(pp[yy == 1], bins=bins, alpha=0.6, label=f"true positive (n={int((yy == 1).sum())})")
        if n in thresholds:
            ax.axvline(thresholds[n], color="k", ls="--", lw=1)
        ax.set(title=n, xlabel="score", ylabel="images")
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_calibration(y: np.ndarray, p: np.ndarray, names: Sequence[str], path: Path) -> Path:
    fig, axes = _grid(len(names))
    for j, (ax, n) in enumerate(zip(axes, names, strict=True)):
        yy, pp = labelled(y[:, j], p[:, j])
        bins = calibration_bins(yy, pp) if len(yy) else []
        ax.plot([0, 1], [0, 1], "--", color="0.6", lw=1)
        if bins:
            ax.plot([b["mean_pred"] for b in bins], [b["observed"] for b in bins], "o-")
            for b in bins:
                ax.annotate(
                    str(b["n"]), (b["mean_pred"], b["observed"]), fontsize=6, xytext=(2, 2), textcoords="offset points"
                )
        ax.set(title=n, xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    return _finish(fig, path)


def plot_history(history_csv: Path, path: Path) -> Path | None:
    if not history_csv.exists():
        return None
    with history_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None

    def col(k: str) -> np.ndarray:
        return np.array([float(r[k]) if r.get(k) not in (None, "", "None") else np.nan for r in rows])

    ep = col("epoch")
    fig, axes = _grid(2)
    axes[0].plot(ep, col("loss"), "o-")
    axes[0].set(title="training loss (masked, class-weighted BCE)", xlabel="epoch")
    for k in rows[0]:
        if k.startswith("val_auc_") or k == "val_mean_auc":
            axes[1].plot(ep, col(k), "o-", label=k.replace("val_auc_", ""))
    axes[1].set(title="validation AUC per epoch", xlabel="epoch", ylim=(0.4, 1.0))
    axes[1].legend(fontsize=8)
    return _finish(fig, path)


def plot_examples(images: np.ndarray, heatmaps: np.ndarray, titles: Sequence[str], path: Path, cols: int = 4) -> Path:
    """Grid of radiographs with the Grad-CAM of the finding named in each title."""
    from models.gradcam import overlay

    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(overlay(images[i], heatmaps[i]))
        ax.set_title(titles[i], fontsize=7)
    return _finish(fig, path)
