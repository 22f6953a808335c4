"""Geometry of the pixel path: aspect-preserving resize, letterboxed for the models.

Letterbox, not centre crop: a centre crop of a portrait 2500x2048 film cuts the lung
apices or costophrenic angles, exactly where small effusions and apical masses show.
Padding costs some resolution (about 18 % of a 224 canvas for that aspect) but never
hides anatomy.  Padding is 0, which after MONOCHROME1 inversion is "black like air", the
same value the collimated border has, so the models see no new edge type.

Resampling is Pillow's bilinear on 32-bit float images with ``reducing_gap=2``: for
downscaling Pillow widens the triangle filter to the scale (antialiasing, area-like),
and the reducing gap first box-averages by an integer factor, which halves the cost on
2500x2048 frames with no visible change.  Float input, float output: no 8-bit rounding
before the model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 2.0


def resize_float(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """2-D float32 image resized to (rows, cols), values kept inside [0, 1]."""
    if image.shape == (rows, cols):
        return image.astype(np.float32, copy=True)
    src = np.ascontiguousarray(image, dtype=np.float32)
    im = Image.frombuffer("F", (src.shape[1], src.shape[0]), src, "raw", "F", 0, 1)
    gap = REDUCING_GAP if (src.shape[0] > 2 * rows and src.shape[1] > 2 * cols) else None
    out = np.asarray(im.resize((cols, rows), RESAMPLE, reducing_gap=gap), dtype=np.float32).copy()
    np.clip(out, 0.0, 1.0, out=out)
    return out


def fit_shape(rows: int, cols: int, size: int) -> tuple[int, int]:
    """Largest (rows, cols) with the same aspect whose longer side is `size` (at least 1 px)."""
    scale = size / max(rows, cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Square float32 (size, size): the image fitted to the longer side, centred, 0-padded."""
    rows, cols = fit_shape(image.shape[0], image.shape[1], size)
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - rows) // 2, (size - cols) // 2
    canvas[top : top + rows, left : left + cols] = resize_float(image, rows, cols)
    return canvas


def fit_within(image: np.ndarray, max_size: int) -> np.ndarray:
    """Downscale so the longer side is at most `max_size`; never upscale (the viewer zooms)."""
    if max(image.shape) <= max_size:
        return np.asarray(image, dtype=np.float32)
    rows, cols = fit_shape(image.shape[0], image.shape[1], max_size)
    return resize_float(image, rows, cols)
