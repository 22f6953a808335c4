"""Metrics, operating thresholds, calibration and score drift, computed only over labelled entries.

Kept free of Keras so the evaluation of a saved score file needs nothing but numpy/sklearn;
shared by training, `evaluate`, `site-report` and the web app's Performance page.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from models.findings import UNLABELLED


def labelled(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop unlabelled entries of one finding's column."""
    keep = y != UNLABELLED
    return y[keep].astype(int), p[keep].astype("float64")


def safe_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present (AUC undefined, not 0.5)."""
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, p))


def bootstrap_auc_ci(
    y: np.ndarray, p: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile 95% interval of the AUC, resampling positives and negatives separately.

    Stratified resampling keeps both classes in every replicate, which matters for our small
    positive counts (a few dozen COVID or mass cases in validation).
    """
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) < 2 or len(neg) < 2:
        return None
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot)
    for i in range(n_boot):
        bp = rng.choice(pos, len(pos))
        bn = rng.choice(neg, len(neg))
        # Mann-Whitney form of the AUC: fast and exact with ties counted half
        allv = np.concatenate([bp, bn])
        ranks = _rankdata(allv)
        aucs[i] = (ranks[: len(bp)].sum() - len(bp) * (len(bp) + 1) / 2) / (len(bp) * len(bn))
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties, without a scipy dependency."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype="float64")
    sa = a[order]
    i = 0
    n = len(a)
    while i < n:
        j = i
        while j + 1 < n and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float = 0.95) -> float:
    """Highest threshold whose sensitivity is still >= target (score >= threshold is positive)."""
    pos = np.sort(p[y == 1])
    if len(pos) == 0:
        return 0.5
    # allow k positives below the threshold: k = floor((1 - target) * n_pos)
    k = math.floor((1.0 - target) * len(pos) + 1e-9)
    return float(pos[min(k, len(pos) - 1)])


@dataclass
class OperatingPoint:
    threshold: float
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    accuracy: float
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(a: int, b: int) -> float | None:
    return float(a / b) if b else None


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> OperatingPoint:
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return OperatingPoint(
        threshold=float(threshold),
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        ppv=_ratio(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
        accuracy=float((tp + tn) / max(1, len(y))),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins: mean predicted vs observed frequency (what the calibration plot shows)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            out.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "n": int(sel.sum()),
                    "mean_pred": float(p[sel].mean()),
                    "observed": float(y[sel].mean()),
                }
            )
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    bins = calibration_bins(y, p, n_bins)
    n = max(1, len(y))
    return float(sum(b["n"] / n * abs(b["mean_pred"] - b["observed"]) for b in bins))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype("float64"), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_platt(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Platt scaling on the logit: calibrated = sigmoid(a * logit(p) + b).

    Class weighting during training buys sensitivity for rare findings at the price of
    inflated probabilities; refitting (a, b) on validation restores probabilities a clinician
    can read.  A non-positive slope would invert the ranking, so it is refused (a = 1, b = 0).
    """
    if len(np.unique(y)) < 2:
        return 1.0, 0.0
    from sklearn.linear_model import LogisticRegression

    z = logit(p).reshape(-1, 1)
    lr = LogisticRegression(C=100.0)
    lr.fit(z, y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if not np.isfinite(a) or a <= 0:
        return 1.0, 0.0
    return a, b


def finding_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Everything metrics.json reports for one finding on one set of labelled images."""
    y, p = labelled(y, p)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out: dict[str, Any] = {"n": len(y), "n_pos": n_pos, "n_neg": n_neg}
    if len(y) == 0:
        return out
    auc = safe_auc(y, p)
    ci = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed) if auc is not None else None
    out["auc"] = auc
    out["auc_ci95"] = list(ci) if ci else None
    out["operating_point"] = operating_point(y, p, threshold).to_dict()
    out["brier"] = brier(y, p)
    out["ece"] = expected_calibration_error(y, p)
    out["calibration_bins"] = calibration_bins(y, p)
    return out


# Score distributions are compared on these equal-width bins of [0, 1].
SCORE_BINS = 10


def score_histogram(p: np.ndarray, bins: int = SCORE_BINS) -> list[int]:
    """Counts of scores per equal-width bin of [0, 1] (1.0 falls in the last bin)."""
    counts, _ = np.histogram(np.clip(np.asarray(p, dtype="float64"), 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return [int(c) for c in counts]


def population_stability_index(reference: list[int], observed: list[int], floor: float = 1e-4) -> float | None:
    """PSI = sum((o - r) * ln(o / r)) over bins of the two distributions' shares.

    Empty bins are floored so one empty bin does not make it infinite.  Common reading: below
    0.1 no shift, 0.1-0.25 moderate, above 0.25 a major shift.  None when either side is empty.
    """
    r, o = np.asarray(reference, dtype="float64"), np.asarray(observed, dtype="float64")
    if r.shape != o.shape or r.sum() == 0 or o.sum() == 0:
        return None
    rs = np.maximum(r / r.sum(), floor)
    os_ = np.maximum(o / o.sum(), floor)
    return float(np.sum((os_ - rs) * np.log(os_ / rs)))


def bootstrap_rate_ci(
    hits: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile interval of a proportion (sensitivity, specificity, PPV) by resampling its cases."""
    hits = np.asarray(hits, dtype="float64")
    if len(hits) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = rng.choice(hits, size=(n_boot, len(hits))).mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
