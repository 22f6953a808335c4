"""Figures that a collection shortcut cannot win: within-collection AUCs, specificity on normals,
a collection leak check and per-collection calibration.

Our collections differ in look (paediatric JPEGs, 512 px NIH PNGs, 224 px RSNA JPEGs of NIH
films, ICU COVID films), and each is labelled for different findings.  A pooled AUC can
therefore be high because the model recognises the collection: "Kermany" means pneumonia,
"RSNA normals" means healthy.  Comparing positives and negatives of one collection removes that
shortcut; asking how well the scores alone predict the collection of *normal* images measures
how much of the shortcut is in the scores at all.

Pure functions of (records, scores, thresholds) returning JSON-able dicts; numpy and sklearn
only, so a saved score file can be re-judged without Keras.  Rendering lives in
``models.card_sections`` (the model card renders the same dict and must not import training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.card_sections import render_collection_report
from models.findings import FINDING_NAMES, FINDINGS, UNLABELLED
from models.metrics import bootstrap_auc_ci, expected_calibration_error, logit, operating_point, safe_auc
from training.readers import Record

__all__ = [
    "COMPARISONS",
    "Comparison",
    "calibration_by_collection",
    "collection_leak",
    "collection_report",
    "comparison_indices",
    "named_comparisons",
    "normalize_thresholds",
    "normals_specificity",
    "operating_points_from_card",
    "render_collection_report",
    "steering_evidence",
    "wilson_interval",
    "within_collection_auc",
]

# An AUC from fewer than this many images of either class is noise, so it is not reported.
MIN_PER_CLASS = 3
# A collection needs this many normal images to take part in the leak check.
MIN_LEAK_PER_COLLECTION = 10
# ECE with 10 bins needs some images per collection to mean anything.
MIN_CALIBRATION = 20
# Collections made only of normal films: their specificity is the false-alarm rate on normals.
NORMALS_SOURCES: tuple[str, ...] = ("rsna-normals",)
# The purest look signal: both are NIH films, only the processing (512 px PNG vs 224 px JPEG) differs.
LEAK_HEADLINE_PAIR: tuple[str, str] = ("nih", "rsna-normals")

Predicate = Callable[[Record], bool]


def _label_is(finding: str, value: int) -> Predicate:
    def pred(r: Record) -> bool:
        return r.label(finding) == value

    return pred


def _raw_label_is(text: str) -> Predicate:
    """Exact raw label (case-insensitive): 'No Finding' must not match 'Mass|No Finding'-like strings."""
    want = text.strip().lower()

    def pred(r: Record) -> bool:
        return r.raw_label.strip().lower() == want

    return pred


@dataclass(frozen=True)
class Comparison:
    """Positives vs negatives of one finding inside one collection (``source``)."""

    name: str
    finding: str
    source: str
    positive: Predicate
    negative: Predicate
    # The evidence for this finding in ``population``: whether it may steer a worklist for
    # images judged at that operating point (triage.policy) is decided on this comparison's
    # test figure, not on any pooled AUC.
    evidence: bool = False
    population: str = "adult"


# The comparisons the project reports first, defined once here.
COMPARISONS: tuple[Comparison, ...] = (
    Comparison(
        "NIH pneumonia/consolidation vs NIH No Finding",
        "pneumonia",
        "nih",
        positive=_label_is("pneumonia", 1),
        negative=_raw_label_is("No Finding"),
        evidence=True,
    ),
    Comparison(
        "NIH mass/nodule vs NIH No Finding",
        "mass",
        "nih",
        positive=_label_is("mass", 1),
        negative=_raw_label_is("No Finding"),
        evidence=True,
    ),
    Comparison(
        "Kermany pneumonia vs normal",
        "pneumonia",
        "kermany",
        positive=_label_is("pneumonia", 1),
        negative=_label_is("pneumonia", 0),
        evidence=True,
        population="paediatric",
    ),
    Comparison(
        "Actualmed COVID-19 vs no finding",
        "covid19",
        "covid-actualmed",
        positive=_label_is("covid19", 1),
        negative=_raw_label_is("No finding"),
        evidence=True,
    ),
)


def steering_evidence(
    report: Mapping[str, Any], comparisons: Sequence[Comparison] = COMPARISONS
) -> dict[str, dict[str, Any]]:
    """Per population and finding, the within-collection figure its steering is decided on
    (for the card): {"adult": {"pneumonia": {comparison, auc, auc_ci95, n_pos, n_neg}, ...}, ...}.

    A finding a population has no comparison for is absent there, and one whose comparison is
    missing from ``report`` has ``auc`` None: no evidence is weak evidence.
    """
    by_name = {c["name"]: c for c in report.get("comparisons", [])}
    out: dict[str, dict[str, Any]] = {}
    for comp in comparisons:
        per = out.setdefault(comp.population, {})
        if comp.evidence and comp.finding not in per:
            got = by_name.get(comp.name, {})
            per[comp.finding] = {
                "comparison": comp.name,
                "auc": got.get("auc"),
                "auc_ci95": got.get("auc_ci95"),
                "n_pos": got.get("n_pos", 0),
                "n_neg": got.get("n_neg", 0),
            }
    return out


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n; None when n == 0.

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0 or n,
    which matters for specificity on normals where k == n is common.
    """
    if n <= 0:
        return None
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact ends at k == 0 and k == n, so "1.000" never prints as 0.99999...
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def normalize_thresholds(thresholds: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """Operating points as ``{name: {finding: threshold}}``.

    A flat ``{finding: threshold}`` dict becomes ``{"default": ...}``; nothing at all falls back
    to each finding's default threshold, which is what the worker applies to a card without any.
    """
    if not thresholds:
        return {"default": {f.name: float(f.default_threshold) for f in FINDINGS}}
    if all(isinstance(v, int | float) for v in thresholds.values()):
        return {"default": {str(k): float(v) for k, v in thresholds.items()}}
    return {str(name): {str(f): float(t) for f, t in th.items()} for name, th in thresholds.items() if th}


def operating_points_from_card(card: Any, thresholds: Mapping[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Operating points of a model card: the card thresholds as "adult", plus ``thresholds_by_population``.

    The card's own thresholds are the adult/default point the worker applies to every population
    without its own entry; a population entry may name only some findings, the rest falling back
    to the card's thresholds (as ``TriageModel.threshold`` does), so each point here is complete.
    ``thresholds`` replaces the card's own set (e.g. the model's thresholds with built-in
    defaults filled in).  If a population entry changes "adult" itself, the card's set is kept
    as "default", so both stay visible.
    """
    base = {str(k): float(v) for k, v in (thresholds if thresholds is not None else card.thresholds).items()}
    by_pop = getattr(card, "thresholds_by_population", None) or {}
    ops: dict[str, dict[str, float]] = {"adult": base}
    for pop, th in by_pop.items():
        merged = {**base, **{str(k): float(v) for k, v in (th or {}).items()}}
        if pop == "adult" and merged != base:
            ops["default"] = base
        ops[str(pop)] = merged
    return ops


def _auc_entry(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """AUC, interval and counts; auc None with a reason when a class has fewer than MIN_PER_CLASS images."""
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out: dict[str, Any] = {"n": n_pos + n_neg, "n_pos": n_pos, "n_neg": n_neg}
    if n_pos < MIN_PER_CLASS or n_neg < MIN_PER_CLASS:
        out.update(
            auc=None,
            auc_ci95=None,
            reason=f"too few images: {n_pos} positive, {n_neg} negative (need {MIN_PER_CLASS} of each)",
        )
        return out
    ci = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    out.update(auc=safe_auc(y, p), auc_ci95=list(ci) if ci else None)
    return out


def _rates_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    op = operating_point(y, p, threshold)
    sens_ci = wilson_interval(op.tp, op.tp + op.fn)
    spec_ci = wilson_interval(op.tn, op.tn + op.fp)
    return {
        "threshold": op.threshold,
        "sensitivity": op.sensitivity,
        "sensitivity_ci95": list(sens_ci) if sens_ci else None,
        "specificity": op.specificity,
        "specificity_ci95": list(spec_ci) if spec_ci else None,
        "tp": op.tp,
        "fn": op.fn,
        "tn": op.tn,
        "fp": op.fp,
    }


def _check(records: Sequence[Record], scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype="float64")
    if s.ndim != 2 or s.shape != (len(records), len(FINDING_NAMES)):
        raise ValueError(f"scores must have shape ({len(records)}, {len(FINDING_NAMES)}), got {s.shape}")
    return s


def comparison_indices(comparison: Comparison, records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the comparison's positive and negative images (an image matching both is dropped)."""
    pos, neg = [], []
    for i, r in enumerate(records):
        if r.source != comparison.source:
            continue
        is_pos, is_neg = comparison.positive(r), comparison.negative(r)
        if is_pos and not is_neg:
            pos.append(i)
        elif is_neg and not is_pos:
            neg.append(i)
    return np.asarray(pos, dtype=int), np.asarray(neg, dtype=int)


def named_comparisons(
    records: Sequence[Record],
    scores: np.ndarray,
    thresholds: Mapping[str, Any] | None,
    comparisons: Sequence[Comparison] = COMPARISONS,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Each comparison: AUC [CI], counts and sensitivity/specificity at every operating point."""
    s = _check(records, scores)
    ops = normalize_thresholds(thresholds)
    out = []
    for c in comparisons:
        pos, neg = comparison_indices(c, records)
        j = FINDING_NAMES.index(c.finding)
        y = np.concatenate([np.ones(len(pos), dtype=int), np.zeros(len(neg), dtype=int)])
        p = np.concatenate([s[pos, j], s[neg, j]])
        entry: dict[str, Any] = {"name": c.name, "finding": c.finding, "source": c.source}
        entry.update(_auc_entry(y, p, n_boot, seed))
        if len(y) == 0:
            entry["reason"] = f"no {c.source} images of either class in these records"
        entry["operating_points"] = {
            name: _rates_at(y, p, th[c.finding]) for name, th in ops.items() if c.finding in th and len(y)
        }
        out.append(entry)
    return out


def within_collection_auc(
    records: Sequence[Record], scores: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{source: {finding: {n, n_pos, n_neg, auc, auc_ci95[, reason]}}}`` over each source's labelled images.

    A source with both classes is listed even when a class is too small for an AUC (auc None and
    the reason), so a reader sees the counts; a source with one class only (Kermany and NIH for
    covid19, RSNA normals for everything) has no within-collection AUC to give and is left out.
    """
    s = _check(records, scores)
    y_all = np.array([r.labels for r in records], dtype=int).reshape(len(records), len(FINDING_NAMES))
    src = np.array([r.source for r in records])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for source in sorted(set(src.tolist())):
        sel = src == source
        for j, finding in enumerate(FINDING_NAMES):
            y = y_all[sel, j]
            keep = y != UNLABELLED
            if len(np.unique(y[keep])) < 2:
                continue
            out.setdefault(source, {})[finding] = _auc_entry(y[keep], s[sel, j][keep], n_boot, seed)
    return out


def normals_specificity(
    records: Sequence[Record],
    scores: np.ndarray,
    thresholds: Mapping[str, Any] | None,
    sources: Sequence[str] = NORMALS_SOURCES,
) -> dict[str, dict[str, Any]]:
    """Specificity per finding and operating point on collections of normal films, with Wilson 95% intervals.

    ``{source: {"n": images, "by_operating_point": {op: {finding: {threshold, n, tn, fp,
    specificity, specificity_ci95}}}}}``; a source absent from the records reports n 0 and a reason.
    Only images labelled negative for the finding count (all of them, in a normals-only collection).
    """
    s = _check(records, scores)
    ops = normalize_thresholds(thresholds)
    out: dict[str, dict[str, Any]] = {}
    for source in sources:
        idx = np.array([i for i, r in enumerate(records) if r.source == source], dtype=int)
        if len(idx) == 0:
            out[source] = {"n": 0, "reason": f"no {source} images in these records"}
            continue
        by_op: dict[str, dict[str, Any]] = {}
        for name, th in ops.items():
            for j, finding in enumerate(FINDING_NAMES):
                if finding not in th:
                    continue
                neg = idx[[records[i].labels[j] == 0 for i in idx]]
                if len(neg) == 0:
                    continue
                flagged = s[neg, j] >= th[finding]
                fp = int(flagged.sum())
                tn = len(neg) - fp
                ci = wilson_interval(tn, len(neg))
                by_op.setdefault(name, {})[finding] = {
                    "threshold": float(th[finding]),
                    "n": len(neg),
                    "tn": tn,
                    "fp": fp,
                    "specificity": tn / len(neg),
                    "specificity_ci95": list(ci) if ci else None,
                }
        out[source] = {"n": len(idx), "by_operating_point": by_op}
    return out


def _is_normal(r: Record) -> bool:
    """Negative for every finding it is labelled for, and labelled for at least one."""
    known = [v for v in r.labels if v != UNLABELLED]
    return bool(known) and all(v == 0 for v in known)


def _cv_proba(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    folds = StratifiedKFold(n_splits=min(5, int(np.bincount(y).min())), shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    return cross_val_predict(clf, x, y, cv=folds, method="predict_proba")


def collection_leak(
    records: Sequence[Record],
    scores: np.ndarray,
    groups: Sequence[str] | None = None,
    only_normals: bool = True,
    seed: int = 0,
    min_per_collection: int = MIN_LEAK_PER_COLLECTION,
) -> dict[str, Any]:
    """How well the score vectors alone predict an image's collection (0.5 = not at all).

    On normals only (by default) the labels cannot explain a score difference, so any
    predictability is the collection's look showing through the scores.  For each pair of
    collections with ``min_per_collection`` such images: a stratified 5-fold cross-validated AUC of
    a class-balanced logistic regression on the logits of the scores.  The headline is
    ``nih`` vs ``rsna-normals`` when both are present (the same NIH films, processed differently),
    else the largest pair.  ``multi`` is the macro one-vs-rest AUC over all such collections.
    ``groups`` replaces ``record.source`` as the collection name when given.
    """
    s = _check(records, scores)
    names = list(groups) if groups is not None else [r.source for r in records]
    if len(names) != len(records):
        raise ValueError("groups must name one collection per record")
    keep = np.array([_is_normal(r) for r in records] if only_normals else [True] * len(records), dtype=bool)
    x_all = logit(s)
    g = np.array(names, dtype=object)
    counts = {k: int(np.sum(keep & (g == k))) for k in sorted(set(names))}
    usable = [k for k, n in counts.items() if n >= min_per_collection]
    out: dict[str, Any] = {
        "only_normals": only_normals,
        "min_per_collection": min_per_collection,
        "n_by_collection": {k: counts[k] for k in usable},
        "skipped": {k: n for k, n in counts.items() if n < min_per_collection},
        "pairs": [],
    }
    for a, b in combinations(usable, 2):
        sel = keep & ((g == a) | (g == b))
        y = (g[sel] == b).astype(int)
        proba = _cv_proba(x_all[sel], y, seed)
        out["pairs"].append(
            {"a": a, "b": b, "n_a": counts[a], "n_b": counts[b], "auc": float(roc_auc_score(y, proba[:, 1]))}
        )
    if not out["pairs"]:
        out["headline"] = None
        out["reason"] = f"fewer than two collections with {min_per_collection} or more images"
        out["multi"] = None
        return out
    head = next(
        (p for p in out["pairs"] if {p["a"], p["b"]} == set(LEAK_HEADLINE_PAIR)),
        None,
    )
    if head is not None:
        why = "the same NIH films, processed differently: a pure look signal"
    else:
        head = max(out["pairs"], key=lambda p: p["auc"])
        why = f"the largest pair ({' and '.join(LEAK_HEADLINE_PAIR)} normals are not both present)"
    out["headline"] = {
        "pair": [head["a"], head["b"]],
        "auc": head["auc"],
        "n_a": head["n_a"],
        "n_b": head["n_b"],
        "why": why,
    }
    sel = keep & np.isin(g, usable)
    labels = np.array([usable.index(k) for k in g[sel]], dtype=int)
    proba = _cv_proba(x_all[sel], labels, seed)
    if len(usable) == 2:
        macro = float(roc_auc_score(labels, proba[:, 1]))
    else:
        macro = float(roc_auc_score(labels, proba, multi_class="ovr", average="macro"))
    out["multi"] = {"collections": {k: counts[k] for k in usable}, "macro_ovr_auc": macro}
    return out


def calibration_by_collection(
    records: Sequence[Record], scores: np.ndarray, min_images: int = MIN_CALIBRATION
) -> dict[str, dict[str, Any]]:
    """Per finding ECE over all labelled images and within each collection with ``min_images`` labelled.

    ``{finding: {"all": {n, n_pos, ece}, "by_source": {source: {n, n_pos, ece}}}}``.
    """
    s = _check(records, scores)
    y_all = np.array([r.labels for r in records], dtype=int).reshape(len(records), len(FINDING_NAMES))
    src = np.array([r.source for r in records])
    out: dict[str, dict[str, Any]] = {}
    for j, finding in enumerate(FINDING_NAMES):
        lab = y_all[:, j] != UNLABELLED
        if not lab.any():
            continue
        entry: dict[str, Any] = {
            "all": {
                "n": int(lab.sum()),
                "n_pos": int((y_all[lab, j] == 1).sum()),
                "ece": expected_calibration_error(y_all[lab, j], s[lab, j]),
            },
            "by_source": {},
        }
        for source in sorted(set(src[lab].tolist())):
            sel = lab & (src == source)
            if sel.sum() >= min_images:
                entry["by_source"][source] = {
                    "n": int(sel.sum()),
                    "n_pos": int((y_all[sel, j] == 1).sum()),
                    "ece": expected_calibration_error(y_all[sel, j], s[sel, j]),
                }
        out[finding] = entry
    return out


def collection_report(
    records: Sequence[Record],
    scores: np.ndarray,
    thresholds: Mapping[str, Any] | None,
    n_boot: int = 1000,
    seed: int = 0,
    normals_sources: Sequence[str] = NORMALS_SOURCES,
    comparisons: Sequence[Comparison] = COMPARISONS,
) -> dict[str, Any]:
    """Everything above in one JSON-able dict (what metrics.json and the card store under "collections")."""
    s = _check(records, scores)
    return {
        "n_images": len(records),
        "operating_points": normalize_thresholds(thresholds),
        "comparisons": named_comparisons(records, s, thresholds, comparisons, n_boot=n_boot, seed=seed),
        "within_collection": within_collection_auc(records, s, n_boot=n_boot, seed=seed),
        "normals_specificity": normals_specificity(records, s, thresholds, normals_sources),
        "collection_leak": collection_leak(records, s, seed=seed),
        "calibration": calibration_by_collection(records, s),
    }
