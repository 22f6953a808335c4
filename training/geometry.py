"""Positioning jitter for training batches on the CPU, with the target maps moved alike.

Patients are never placed identically: a few degrees of rotation, some shift, a different
distance to the detector (zoom) and a different field of view (aspect).  Inside the model graph
these jitters cannot move a localisation target with the image, so a model with dense
finding maps gets them here instead: one affine matrix per image, applied to the image
(bilinear) and to the lesion mask (nearest), so the target says where the lesion is *after*
the jitter.  Never a horizontal flip unless a config asks for one on purpose (situs and side
markers: ``models.architectures.AugmentConfig``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage as ndi


def random_matrix(shape: tuple[int, int], cfg: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(A, t) mapping an *output* pixel (row, col) to the input pixel A @ p + t.

    ``cfg`` is an ``AugmentConfig``: rotation in degrees, translation and zoom as fractions of the
    side, aspect as extra width zoom; about the image centre, as Keras' random layers do.
    """
    h, w = shape
    angle = math.radians(float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)))
    zoom_h = 1.0 + float(rng.uniform(-cfg.zoom, cfg.zoom))
    zoom_w = zoom_h + float(rng.uniform(-cfg.aspect, cfg.aspect))
    shift = np.array([rng.uniform(-cfg.translate, cfg.translate) * h, rng.uniform(-cfg.translate, cfg.translate) * w])
    flip = bool(cfg.horizontal_flip) and bool(rng.random() < 0.5)
    cos, sin = math.cos(angle), math.sin(angle)
    # input = centre + R^-1 (S^-1 (output - centre - shift)): zoom > 1 magnifies the film
    rot_inv = np.array([[cos, sin], [-sin, cos]])
    scale_inv = np.diag([1.0 / zoom_h, (-1.0 if flip else 1.0) / zoom_w])
    a = rot_inv @ scale_inv
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    t = centre - a @ (centre + shift)
    return a, t


def warp(image: np.ndarray, a: np.ndarray, t: np.ndarray, order: int = 1) -> np.ndarray:
    """Resample a 2-D image through (A, t); outside the film is black (0), as a letterbox is."""
    return ndi.affine_transform(
        np.asarray(image, dtype=np.float32), a, offset=t, order=order, mode="constant", cval=0.0, prefilter=False
    )


def jitter_batch(
    x: np.ndarray, cfg: Any, rng: np.random.Generator, masks: dict[int, np.ndarray] | None = None
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(n, H, W, 1) batch, each image with its own draw; ``masks`` {index: (H, W) bool} move alike."""
    out = np.empty(x.shape, dtype=np.float32)
    moved: dict[int, np.ndarray] = {}
    masks = masks or {}
    for i in range(len(x)):
        a, t = random_matrix(x.shape[1:3], cfg, rng)
        out[i, ..., 0] = warp(x[i, ..., 0], a, t)
        if i in masks:
            moved[i] = warp(masks[i].astype(np.float32), a, t, order=0) > 0.5
    return out, moved


def cell_targets(mask: np.ndarray, cells: int) -> np.ndarray:
    """(cells, cells) 0/1: a cell is positive when any pixel of the lesion falls in it.

    A 5-mm nodule is under one cell wide, so "any pixel" (not "most of the cell") keeps it.
    """
    h, w = mask.shape
    rows = (np.arange(h) * cells) // h
    cols = (np.arange(w) * cells) // w
    out = np.zeros((cells, cells), dtype=np.float32)
    rr, cc = np.nonzero(mask)
    out[rows[rr], cols[cc]] = 1.0
    return out
