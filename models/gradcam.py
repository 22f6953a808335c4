"""Grad-CAM heatmaps per finding, aligned with the pixel-path tensor the model was given.

For our models the head after the ``cam_features`` layer is global average pooling, dropout
(identity at inference) and one Dense layer, so the Grad-CAM channel weights of a finding's
logit are exactly that Dense layer's column divided by H*W: Grad-CAM reduces to a forward
pass plus a matrix product.  That exact form needs no gradients, so it runs on every Keras
backend and costs one forward pass for all findings at once.  For a foreign model whose head
differs, ``gradcam_gradient`` computes the textbook Grad-CAM with TensorFlow gradients; the
tests check that both agree on our models.

A finding scored from its own dense map (``models.architectures.map_layer_name``, e.g. mass
and nodule at stride 8) needs no Grad-CAM: its heatmap is that map, which the model was trained
to light up where an inserted lesion lies, through the model's calibration, per cell.

Maps are (size, size) like the letterboxed model input.  ``colorize`` turns one into the RGBA
PNG the worker stores and the viewer overlays; ``crop_letterbox`` maps it back onto the image
(both live in ``models.heatmap_image``, which the web app imports without loading Keras).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from models.architectures import CALIBRATION_LAYER, CAM_LAYER, LOGITS_LAYER, map_layer_name
from models.findings import FINDING_INDEX, FINDING_NAMES
from models.heatmap_image import colorize, crop_letterbox, ramp

__all__ = ["colorize", "crop_letterbox", "gradcam", "gradcam_gradient", "overlay"]


def _map_findings(model: keras.Model) -> list[str]:
    """Findings this model scores from a dense map of its own, in FINDING_NAMES order."""
    names = {layer.name for layer in model.layers}
    return [f for f in FINDING_NAMES if map_layer_name(f) in names]


def _calibration(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    try:
        scale, offset = model.get_layer(CALIBRATION_LAYER).get_weights()
    except ValueError:
        return np.ones(len(FINDING_NAMES), "float32"), np.zeros(len(FINDING_NAMES), "float32")
    return np.asarray(scale, "float32"), np.asarray(offset, "float32")


def _feature_model(model: keras.Model, layer: str = CAM_LAYER) -> keras.Model:
    """[cam features, each dense finding map, scores] in one forward pass (cached per model)."""
    cached = getattr(model, "_xt_cam_model", None)
    if cached is not None:
        return cached
    maps = [model.get_layer(map_layer_name(f)).output for f in _map_findings(model)]
    feat = keras.Model(model.inputs, [model.get_layer(layer).output, *maps, model.output])
    try:
        model._xt_cam_model = feat  # cache on the instance: building the sub-model is not free
    except AttributeError:  # pragma: no cover - Keras may forbid new attributes on some versions
        pass
    return feat


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (n, h, w, c) -> (n, H, W, c) with pixel-centre alignment, numpy only."""
    _, h, w, _ = maps.shape
    hh, ww = size
    ys = (np.arange(hh) + 0.5) * h / hh - 0.5
    xs = (np.arange(ww) + 0.5) * w / ww - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
    y1 = np.clip(y0 + 1, 0, h - 1)
    x1 = np.clip(x0 + 1, 0, w - 1)
    wy = np.clip(ys - y0, 0, 1)[None, :, None, None]
    wx = np.clip(xs - x0, 0, 1)[None, None, :, None]
    top = maps[:, y0][:, :, x0] * (1 - wx) + maps[:, y0][:, :, x1] * wx
    bot = maps[:, y1][:, :, x0] * (1 - wx) + maps[:, y1][:, :, x1] * wx
    return (top * (1 - wy) + bot * wy).astype("float32")


def _normalize(cams: np.ndarray) -> np.ndarray:
    """ReLU then scale each map to [0, 1]; an all-zero map stays zero (no evidence, not noise)."""
    cams = np.maximum(cams, 0.0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cams / np.where(peak > 0, peak, 1.0), 0.0).astype("float32")


def _finding_indices(findings: str | Sequence[str] | None) -> list[int]:
    if findings is None:
        return list(range(len(FINDING_NAMES)))
    if isinstance(findings, str):
        findings = [findings]
    return [FINDING_INDEX[f] for f in findings]


def gradcam(
    model: keras.Model, images: np.ndarray, findings: str | Sequence[str] | None = None, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (n, len(findings), H, W) in [0, 1] aligned with ``images`` (n, H, W, 1), and scores (n, 3).

    Uses the exact closed form for our head, and a finding's own dense map where it has one;
    falls back to gradients for any other head.
    """
    images = np.asarray(images, dtype="float32")
    if images.ndim == 3:
        images = images[None]
    idx = _finding_indices(findings)
    try:
        dense = model.get_layer(LOGITS_LAYER)
        kernel = np.asarray(dense.get_weights()[0])  # (channels, n_findings)
        feat_model = _feature_model(model)
    except (ValueError, KeyError, IndexError):
        return gradcam_gradient(model, images, findings)
    own = _map_findings(model)
    scale, offset = _calibration(model)
    maps_all, scores_all = [], []
    for start in range(0, len(images), batch_size):
        feats, *dense_maps, scores = feat_model.predict_on_batch(images[start : start + batch_size])
        feats = np.asarray(feats, dtype="float32")
        h, w = feats.shape[1:3]
        cams = np.einsum("nhwk,kc->nhwc", feats, kernel[:, idx]) / float(h * w)
        cams = _upsample(cams, images.shape[1:3])
        for c, j in enumerate(idx):
            if FINDING_NAMES[j] in own:
                logit = np.asarray(dense_maps[own.index(FINDING_NAMES[j])], dtype="float32")
                prob = 1.0 / (1.0 + np.exp(-(scale[j] * logit + offset[j])))
                cams[..., c] = _upsample(prob, images.shape[1:3])[..., 0]
        maps_all.append(cams)
        scores_all.append(np.asarray(scores, dtype="float32"))
    maps = _normalize(np.concatenate(maps_all))  # (n, H, W, c)
    return np.transpose(maps, (0, 3, 1, 2)), np.concatenate(scores_all)


def gradcam_gradient(
    model: keras.Model, images: np.ndarray, findings: str | Sequence[str] | None = None, layer: str = CAM_LAYER
) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Grad-CAM (Selvaraju et al.) on the logit of each finding, via TensorFlow gradients."""
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError("gradient Grad-CAM is implemented for the TensorFlow backend only")
    import tensorflow as tf

    idx = _finding_indices(findings)
    logits_layer: Any = None
    try:
        logits_layer = model.get_layer(LOGITS_LAYER)
    except ValueError:
        logits_layer = None
    target = logits_layer.output if logits_layer is not None else model.output
    grad_model = keras.Model(model.inputs, [model.get_layer(layer).output, target, model.output])
    x = tf.convert_to_tensor(np.asarray(images, dtype="float32"))
    maps = []
    scores = None
    for c in idx:
        with tf.GradientTape() as tape:
            feats, logits, scores = grad_model(x, training=False)
            y = logits[:, c]
        grads = tape.gradient(y, feats)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.reduce_sum(weights * feats, axis=-1).numpy()[..., None]
        maps.append(_upsample(cam, images.shape[1:3])[..., 0])
    out = _normalize(np.stack(maps, axis=-1))
    return np.transpose(out, (0, 3, 1, 2)), np.asarray(scores, dtype="float32")


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB float image in [0, 1]: grey radiograph with the heatmap in a jet-like colour ramp."""
    grey = np.clip(np.asarray(image, dtype="float32").squeeze(), 0, 1)
    h = np.clip(np.asarray(heatmap, dtype="float32"), 0, 1)
    base = np.repeat(grey[..., None], 3, axis=-1)
    a = alpha * h[..., None]
    return (base * (1 - a) + ramp(h) * a).astype("float32")
