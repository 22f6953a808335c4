"""Do the mass heatmaps point at the nodule?  Measured with synthetic nodules of known place.

No collection here has nodule boxes, so a heatmap's aim cannot be checked on real nodules.
A synthetic nodule (``training.synthetic_nodules``) inserted into a held-out adult normal has a
known centre and size: the share of those whose Grad-CAM maximum falls inside the nodule says
how far the map can be trusted to show *where*.  The same films with and without the nodule
also give a detection AUC on pairs that differ only by the nodule.  These are figures about
synthetic nodules, reported on their own and never mixed into the real-finding metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from models.findings import FINDING_NAMES
from models.metrics import bootstrap_auc_ci, safe_auc
from training.synthetic_nodules import add_synthetic_nodule, inside_nodule, lung_mask

# Lenient hit: the maximum within this many pixels of the nodule edge.  The 224-px model's last
# feature map is 7x7, one cell 32 px wide, so a map cannot be sharper than about half a cell.
TOLERANCE_PX = 16.0

HeatmapFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def synthetic_localisation(
    heatmaps: HeatmapFn,
    x_normals: np.ndarray,
    seed: int = 0,
    n_boot: int = 1000,
    batch_size: int = 32,
    **nodule_kwargs: Any,
) -> dict[str, Any]:
    """Insert one nodule into each held-out normal and judge the mass map and score.

    ``heatmaps(batch) -> (maps (n, n_findings, H, W), probs (n, n_findings))`` is
    ``TriageModel.heatmaps`` or ``models.gradcam.gradcam`` bound to a model.
    """
    mass = FINDING_NAMES.index("mass")
    rng = np.random.default_rng(seed)
    with_nodule, specs, keep = [], [], []
    for i, img in enumerate(np.asarray(x_normals, dtype=np.float32)):
        out, spec = add_synthetic_nodule(img[..., 0], rng, mask=lung_mask(img[..., 0]), **nodule_kwargs)
        if spec is not None:
            with_nodule.append(out[..., None])
            specs.append(spec)
            keep.append(i)
    if not specs:
        return {"n": 0, "reason": "no lung field found for any nodule"}
    x_pos = np.stack(with_nodule)
    x_neg = np.asarray(x_normals, dtype=np.float32)[keep]
    hits, near, dist_px, s_pos, s_neg = [], [], [], [], []
    for start in range(0, len(specs), batch_size):
        maps, probs = heatmaps(x_pos[start : start + batch_size])
        _, probs_neg = heatmaps(x_neg[start : start + batch_size])
        s_pos += [float(v) for v in probs[:, mass]]
        s_neg += [float(v) for v in probs_neg[:, mass]]
        for k, spec in enumerate(specs[start : start + batch_size]):
            m = maps[k, mass]
            r, c = np.unravel_index(int(np.argmax(m)), m.shape)
            hits.append(bool(inside_nodule(spec, float(r), float(c))))
            d = float(np.hypot(r - spec.row, c - spec.col))
            near.append(d <= spec.diameter_px / 2.0 + TOLERANCE_PX)
            dist_px.append(d)
    y = np.r_[np.ones(len(s_pos)), np.zeros(len(s_neg))].astype(int)
    s = np.r_[s_pos, s_neg]
    auc = safe_auc(y, s)
    ci = bootstrap_auc_ci(y, s, n_boot=n_boot, seed=seed) if auc is not None else None
    diam = np.array([sp.diameter_mm for sp in specs])
    small = diam < 15.0
    return {
        "n": len(specs),
        "share_max_inside_nodule": float(np.mean(hits)),
        "share_max_within_tolerance": float(np.mean(near)),
        "tolerance_px": TOLERANCE_PX,
        "median_distance_px": float(np.median(dist_px)),
        "share_inside_small_lt15mm": float(np.mean(np.array(hits)[small])) if small.any() else None,
        "share_inside_large_ge15mm": float(np.mean(np.array(hits)[~small])) if (~small).any() else None,
        "detection_auc_paired": auc,
        "detection_auc_ci95": list(ci) if ci else None,
        "diameter_mm_range": [float(diam.min()), float(diam.max())],
    }
