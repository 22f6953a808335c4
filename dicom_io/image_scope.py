"""Whether a PNG or JPEG looks like a chest radiograph at all, judged from its pixels alone.

A DICOM file says what it is (Modality, Body Part Examined, View Position: ``eligibility``);
a PNG or JPEG says nothing, and the model scores whatever it is given: a photograph of a dog
came back "pneumonia 0.998".  These checks cannot tell a chest from a knee, but they do
refuse what is plainly no frontal chest film: a colour picture, a strip or a panorama, a
thumbnail, a nearly blank image.  The bounds are a site's settings
(``eligibility.headerless``), measured on the training collections (docs/pixel-path.md).

Data in, data out: the decoded pixels in, the measures and the verdict out, so the figures
behind the defaults are measured with the same code that applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_io.eligibility import Eligibility
from dicom_io.pixels import LUMA_WEIGHTS
from settings import HeaderlessImageConfig

INELIGIBLE_PREFIX = "ineligible: "
# Enough pixels for stable shares and percentiles, few enough that a 4000 px photo costs nothing.
SAMPLES = 512 * 512


@dataclass(frozen=True)
class ImageMeasures:
    """What the checks look at: size, how coloured, how much contrast.

    ``coloured_share`` and ``contrast`` are shares of the image's full scale (255 for 8 bits),
    so one bound serves 8 and 16 bit files alike.
    """

    rows: int
    columns: int
    coloured_share: float
    contrast: float

    @property
    def aspect(self) -> float:
        """Longer side over shorter side (1.0 for a square)."""
        return max(self.rows, self.columns) / max(1, min(self.rows, self.columns))


def _grid(pixels: np.ndarray) -> np.ndarray:
    step = max(1, int(np.sqrt(pixels.shape[0] * pixels.shape[1] / SAMPLES)))
    return pixels[::step, ::step]


def _full_scale(sample: np.ndarray) -> float:
    """255 for 8 bits; for deeper files the smallest bit depth that holds the brightest pixel,
    so a 12-bit film stored in 16 bits is judged on its 12 bits."""
    if np.issubdtype(sample.dtype, np.integer):
        if sample.dtype.itemsize == 1:
            return 255.0
        brightest = int(sample.max(initial=0))
        return float(2 ** max(8, brightest.bit_length()) - 1)
    top = float(np.nanmax(sample)) if sample.size else 1.0
    return max(top, 1.0)


def measure_image(pixels: np.ndarray, colour_level: float, shape: tuple[int, int] | None = None) -> ImageMeasures:
    """The measures of a decoded image: (rows, cols) grey or (rows, cols, 3) RGB as stored.

    ``shape`` is the image's own size when ``pixels`` was decoded at reduced resolution.
    ``colour_level``: how far apart (share of full scale) a pixel's channels must be to count
    as coloured.
    """
    rows, columns = shape or (int(pixels.shape[0]), int(pixels.shape[1]))
    sample = _grid(pixels)
    scale = _full_scale(sample)
    values = sample.astype(np.float32)
    if values.ndim == 3 and values.shape[-1] >= 3:
        rgb = values[..., :3]
        spread = rgb.max(axis=-1) - rgb.min(axis=-1)
        coloured = float(np.mean(spread > colour_level * scale)) if spread.size else 0.0
        grey = rgb @ np.array(LUMA_WEIGHTS, dtype=np.float32)
    else:
        coloured = 0.0
        grey = values if values.ndim == 2 else values[..., 0]
    if grey.size:
        lo, hi = (float(v) for v in np.percentile(grey, [1.0, 99.0]))
        contrast = (hi - lo) / scale
    else:
        contrast = 0.0
    return ImageMeasures(rows=rows, columns=columns, coloured_share=coloured, contrast=contrast)


def scope_reasons(measures: ImageMeasures, rules: HeaderlessImageConfig) -> list[str]:
    """Each bound the image is outside, in words a radiologist reads (empty: in scope)."""
    m = measures
    reasons: list[str] = []
    if m.coloured_share > rules.max_colour_share:
        reasons.append("colour image, not a radiograph")
    if min(m.rows, m.columns) < rules.min_side:
        reasons.append(f"image too small ({m.columns}x{m.rows} pixels, at least {rules.min_side} on each side)")
    if m.aspect > rules.max_aspect:
        longer, shorter = ("wide", "tall") if m.columns > m.rows else ("tall", "wide")
        reasons.append(f"image {m.aspect:.1f} times as {longer} as {shorter}")
    if m.contrast < rules.min_contrast:
        reasons.append("image nearly blank (almost no contrast)")
    return reasons


def check_image_scope(
    pixels: np.ndarray, rules: HeaderlessImageConfig | None = None, shape: tuple[int, int] | None = None
) -> Eligibility:
    """The verdict on a header-less image, in the form ``check_eligibility`` gives a header's."""
    rules = rules or HeaderlessImageConfig()
    reasons = scope_reasons(measure_image(pixels, rules.colour_level, shape), rules)
    if reasons:
        return Eligibility(eligible=False, reason=INELIGIBLE_PREFIX + "; ".join(reasons), reasons=tuple(reasons))
    return Eligibility(eligible=True, reason=None)
