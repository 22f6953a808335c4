"""Heatmaps as pictures: the colour ramp, the RGBA layer the viewer overlays, the letterbox cut.

Kept apart from ``models.gradcam`` (which imports Keras) so the web app can serve heatmaps
without loading TensorFlow.
"""

from __future__ import annotations

import numpy as np

from dicom_io.resize import fit_shape


def ramp(heat: np.ndarray) -> np.ndarray:
    """Jet-like colour ramp (blue, cyan, yellow, red) as float32 RGB in [0, 1], for heat in [0, 1]."""
    return np.stack(
        [
            np.clip(1.5 - np.abs(4 * heat - 3), 0, 1),
            np.clip(1.5 - np.abs(4 * heat - 2), 0, 1),
            np.clip(1.5 - np.abs(4 * heat - 1), 0, 1),
        ],
        axis=-1,
    ).astype("float32")


# Heat at or below this is transparent: Grad-CAM's faint background would otherwise tint the
# whole film blue and hide the grey levels the radiologist reads.
HEAT_FLOOR = 0.05
# alpha = heat ** gamma: below 1, so moderate heat stays visible under a low viewer opacity.
ALPHA_GAMMA = 0.8


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA of the heatmap alone, alpha growing with the heat.

    The viewer stacks this over its own rendering of the radiograph and scales the alpha with
    an opacity control, so the radiograph is never baked into the stored PNG.  Like the map,
    the result is aligned with the letterboxed model tensor (size x size, padding included);
    ``crop_letterbox`` cuts it to the image's own area.
    """
    h = np.clip(np.asarray(heatmap, dtype="float32"), 0, 1)
    alpha = np.where(h > HEAT_FLOOR, h**ALPHA_GAMMA, 0.0)
    rgba = np.concatenate([ramp(h), alpha[..., None]], axis=-1)
    return (rgba * 255.0 + 0.5).astype(np.uint8)


def crop_letterbox(arr: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """The part of a (size, size[, C]) model-aligned array that covers the image, padding removed.

    ``image_shape`` is the original image's (rows, cols).  The geometry is the pixel path's
    (``dicom_io.resize.fit_shape``, centred as in ``letterbox_transformed``), so the result has
    the original's aspect within a pixel and can be stretched onto the displayed image.
    """
    size = arr.shape[0]
    if arr.ndim < 2 or arr.shape[1] != size:
        raise ValueError(f"expected a square (size, size[, C]) array, got shape {arr.shape}")
    rows, cols = fit_shape(int(image_shape[0]), int(image_shape[1]), size)
    top, left = (size - rows) // 2, (size - cols) // 2  # as letterbox_transformed places the image
    return arr[top : top + rows, left : left + cols]
