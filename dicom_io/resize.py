"""Geometry of the pixel path: aspect-preserving resize, letterboxed for the models.

Letterbox, not centre crop: a centre crop of a portrait 2500x2048 film cuts the lung
apices or costophrenic angles, exactly where small effusions and apical masses show.
Padding costs some resolution (about 18 % of a 224 canvas for that aspect) but never
hides anatomy.  Padding is 0 (black, like air and the collimated border), so the models
see no new edge type.

Resampling, in two stages, identical for training, serving and display:
1. box-average by the integer factor k = floor(scale / 2) (area reduction; the few
   remainder rows/columns, fewer than k, are trimmed equally from both sides);
2. Pillow bilinear on the float32 result to the exact size (antialiased: Pillow widens
   the filter to the scale).
Stage 1 runs strip by strip TOGETHER with the grey-level transform, so a 2500x2048 frame
is read once and never exists as a full float32 image on the model path; strips stay in
the CPU cache.  Every operation is elementwise or a fixed-order sum, so the fused and
the materialised routes give bit-identical results.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

Transform = Callable[[np.ndarray], np.ndarray]  # stored-value strip -> float32 [0, 1] strip

RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 2.0
# Rows of input per strip: ~128k pixels keeps a float32 strip well inside L2.
STRIP_PIXELS = 1 << 17


def identity(strip: np.ndarray) -> np.ndarray:
    return np.asarray(strip, dtype=np.float32)


def _strip_rows(cols: int, multiple: int) -> int:
    rows = max(1, STRIP_PIXELS // max(cols, 1))
    return max(multiple, rows // multiple * multiple)


def apply_in_strips(pixels: np.ndarray, transform: Transform) -> np.ndarray:
    """The full-resolution float32 image, computed strip by strip (cache-friendly)."""
    rows, cols = pixels.shape[0], pixels.shape[1]
    out = np.empty((rows, cols), dtype=np.float32)
    step = _strip_rows(cols, 1)
    for r0 in range(0, rows, step):
        out[r0 : r0 + step] = transform(pixels[r0 : r0 + step])
    return out


def reduce_factor(rows: int, cols: int, out_rows: int, out_cols: int) -> int:
    return max(1, int(min(rows / out_rows, cols / out_cols) / REDUCING_GAP))


def _box_reduce(pixels: np.ndarray, transform: Transform, k: int) -> np.ndarray:
    rows, cols = pixels.shape[0], pixels.shape[1]
    top, left = (rows % k) // 2, (cols % k) // 2
    n_rows, n_cols = rows // k, cols // k
    width = n_cols * k
    out = np.empty((n_rows, n_cols), dtype=np.float32)
    step = _strip_rows(width, k)
    scale = np.float32(1.0 / (k * k))
    for r0 in range(0, n_rows * k, step):
        r1 = min(r0 + step, n_rows * k)
        strip = transform(pixels[top + r0 : top + r1, left : left + width])
        # Strided adds, not reshape().sum(): numpy reduces tiny trailing axes slowly.
        rows_sum = strip[0::k].copy()
        for i in range(1, k):
            rows_sum += strip[i::k]
        block = rows_sum[:, 0::k].copy()
        for j in range(1, k):
            block += rows_sum[:, j::k]
        block *= scale
        out[r0 // k : r1 // k] = block
    return out


def _bilinear(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if image.shape == (rows, cols):
        return np.array(image, dtype=np.float32)
    src = np.ascontiguousarray(image, dtype=np.float32)
    im = Image.frombuffer("F", (src.shape[1], src.shape[0]), src, "raw", "F", 0, 1)
    out = np.array(im.resize((cols, rows), RESAMPLE), dtype=np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def resize_transformed(pixels: np.ndarray, transform: Transform, rows: int, cols: int) -> np.ndarray:
    """transform(pixels) resized to (rows, cols) by the two stages in the module docstring."""
    k = reduce_factor(pixels.shape[0], pixels.shape[1], rows, cols)
    small = apply_in_strips(pixels, transform) if k == 1 else _box_reduce(pixels, transform, k)
    return _bilinear(small, rows, cols)


def resize_float(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """2-D float32 image in [0, 1] resized to (rows, cols)."""
    return resize_transformed(image, identity, rows, cols)


def fit_shape(rows: int, cols: int, size: int) -> tuple[int, int]:
    """Largest (rows, cols) with the same aspect whose longer side is `size` (at least 1 px)."""
    scale = size / max(rows, cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def letterbox_transformed(
    pixels: np.ndarray, transform: Transform, size: int, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Square float32 (size, size): fitted to the longer side, centred, 0-padded.

    ``shape``: the image's full (rows, cols) when `pixels` is a reduced-resolution decode of
    it; the fitted rectangle is computed from it, so both decodes fill the same pixels."""
    full = shape if shape is not None and shape != (0, 0) else (pixels.shape[0], pixels.shape[1])
    rows, cols = fit_shape(full[0], full[1], size)
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - rows) // 2, (size - cols) // 2
    canvas[top : top + rows, left : left + cols] = resize_transformed(pixels, transform, rows, cols)
    return canvas


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    return letterbox_transformed(image, identity, size)


def fit_within_transformed(pixels: np.ndarray, transform: Transform, max_size: int) -> np.ndarray:
    """Downscale so the longer side is at most `max_size`; never upscale (the viewer zooms)."""
    if max(pixels.shape[0], pixels.shape[1]) <= max_size:
        return apply_in_strips(pixels, transform)
    rows, cols = fit_shape(pixels.shape[0], pixels.shape[1], max_size)
    return resize_transformed(pixels, transform, rows, cols)


def fit_within(image: np.ndarray, max_size: int) -> np.ndarray:
    return fit_within_transformed(image, identity, max_size)
