"""The radiograph's values for a viewer that windows it itself (window/level in the browser).

The display PNG (``pixels.render_display``) has the VOI already applied: 8 bits, one window.
To let a radiologist widen or narrow the window, the viewer needs the values *before* the VOI:
the Modality LUT output (grey) or the luma (colour), here resized like the display image and
mapped linearly onto 16 bits.  The default window is the very one the pixel path used for the
model (header, VOI LUT or percentile: ``render(dec).window``), given in the same units, so the
viewer's first picture is the model's rendering and "reset" returns to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_io.decode import Source, decode
from dicom_io.pixels import render, value_transform
from dicom_io.resize import Transform, fit_within_transformed
from dicom_io.voi import percentile_window, subsample
from settings import PixelsConfig

LEVELS = 65535


@dataclass(frozen=True)
class ViewerImage:
    """uint16 values spanning [low, high] (modality units) and the default window in those units."""

    values: np.ndarray  # (rows, cols) uint16; 0 is `low`, 65535 is `high`
    low: float
    high: float
    center: float
    width: float
    window_source: str  # where the default window came from ("Window Center/Width", "percentile", ...)
    invert: bool  # MONOCHROME1: high values are dark
    full_shape: tuple[int, int]  # (rows, cols) of the image itself

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))


def viewer_image(source: Source, max_size: int, limits: PixelsConfig | None = None) -> ViewerImage:
    """The first frame's pre-VOI values, longer side <= max_size (never upscaled)."""
    dec = decode(source, limits)
    window = render(dec).window
    values_of = value_transform(dec)
    low, high = _value_range(dec.array, values_of)
    scale = np.float32(1.0 / (high - low))

    def normalised(strip: np.ndarray) -> np.ndarray:
        # The resize stages work in [0, 1] (and clip to it), so the values are mapped first.
        out = values_of(strip) - np.float32(low)
        out *= scale
        return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)

    values = fit_within_transformed(dec.array, normalised, max_size)
    if window.center is None or window.width is None:
        # A VOI LUT Sequence has no centre/width: start from the percentile window instead.
        sample = low + subsample(values).astype(np.float64) * (high - low)
        window = percentile_window(sample, source="percentile (image has a VOI LUT)")
    assert window.center is not None and window.width is not None
    return ViewerImage(
        values=(np.clip(values, 0.0, 1.0) * LEVELS + 0.5).astype(np.uint16),
        low=low,
        high=high,
        center=float(window.center),
        width=float(window.width),
        window_source=window.source,
        invert=dec.photometric == "MONOCHROME1",
        full_shape=dec.full_shape,
    )


def _value_range(pixels: np.ndarray, values_of: Transform, strip_rows: int = 256) -> tuple[float, float]:
    """(min, max) of the finite values over the whole frame, computed a strip at a time."""
    low, high = np.inf, -np.inf
    for r0 in range(0, pixels.shape[0], strip_rows):
        strip = values_of(pixels[r0 : r0 + strip_rows])
        finite = strip[np.isfinite(strip)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if not np.isfinite(low):
        return 0.0, 1.0
    return low, high if high > low else low + 1.0
