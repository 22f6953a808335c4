"""Simulated lung nodules inserted into real adult normal chest radiographs (training only).

Real mass/nodule positives are scarce (142 NIH films, with noisy report-mined labels), so
extra positives are made by adding a physically plausible focal opacity to a real normal film:
an ellipsoid's projected thickness, with a little low-frequency texture and a blurred margin,
added in a transmission-like intensity domain inside a heuristic lung field.  The host film
stays real, so the model cannot learn "synthetic background"; only the lesion is simulated.

Images are the model tensors of the pixel path (``dicom_io.pixels.to_model_tensor``): float
arrays in [0, 1], 0 = black (air, lungs), 1 = white (bone), (H, W) or (H, W, 1), letterboxed with
exact zeros.  Pixel (i, j) has its centre at row i, column j; nodule centres are float.

Everything is pure numpy/scipy and deterministic given the caller's ``np.random.Generator``.
The insert works only in a small window around the nodule (well under a millisecond at 224 px)
because it runs once per training sample; ``lung_mask`` costs a few milliseconds and can be
computed once per film and reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# A 224-px letterboxed adult chest film carries no pixel spacing of its own.  The NIH
# ChestX-ray14 originals (the source of the RSNA normals and the NIH findings) are about
# 2500-3000 px at 0.139-0.143 mm; in nih-findings/labels.csv the longer side spans 383-428 mm
# (median 425 mm).  Letterboxing maps that longer side to 224 px: 425 mm / 224 px ≈ 1.9 mm/px.
# Collimation varies a little from film to film, so sizes in mm are accurate to about ±10%.
DEFAULT_SPACING_MM = 1.9
"""Assumed pixel spacing (mm/px) of a 224-px letterboxed adult chest film without a header."""

DEFAULT_DIAMETER_MM = (5.0, 40.0)
"""Nodules are < 30 mm by definition and masses > 30 mm; 5 mm is about the smallest a film shows."""

DEFAULT_CONTRAST = (0.08, 0.8)
"""Peak added attenuation, the centre's line integral mu * d.  Soft tissue at chest energies
attenuates about 0.2 per cm, so a 5-mm nodule adds about 0.1 and a 4-cm mass about 0.8.  Over
lung (display value about 0.3-0.5) the peak display increase is about (1 - v) times this, less
for small nodules whose peak is blurred.  Measured on 60 RSNA normals x 5 draws: display peak
+0.02-0.33 (5th-95th percentile), median +0.05 below 10 mm, +0.14 at 10-20 mm, +0.23 at 20-30 mm
and +0.30 above 30 mm.  The round masses of the real CR in pydicom-data (RG1, through the pixel
path at 224 px) stand +0.2 to +0.35 above the lung around them.  An earlier range, (0.06, 0.35),
gave 3-4 cm masses only +0.17: fainter than real ones, and the model did not learn them."""

SIZE_CONTRAST_TILT = 0.75
"""Share of the log-contrast draw set by the size quantile: a lesion twice as thick attenuates twice as
much, so large masses sit near the top of the contrast range and small nodules near the bottom,
with the remaining share random (density and composition vary)."""

MAX_ELLIPTICITY = 0.15
"""a = r (1 + e), b = r (1 - e) with e <= this: nodules are round to mildly oval."""

EDGE_BLUR_MM = (1.0, 3.0)
"""Margin unsharpness (lesion margin plus the film's own blur), drawn uniformly, in mm."""

MIN_SIGMA_PX = 0.5
"""Resampling to 224 px alone blurs by about half a pixel, so no edge is sharper than this."""

TEXTURE_AMPLITUDE = 0.12
"""Relative standard deviation of the low-frequency density texture (real nodules are not uniform)."""

SUPPORT_SIGMAS = 2.5
"""The rendered map is cut to zero this many blur sigmas (plus half a pixel) outside the ellipse;
beyond it a blurred square-root edge has fallen below 0.1% of the peak."""

_ANALYSIS_SIZE = 112
_MIN_LUNG_DETAIL = 0.01  # high-pass SD at the analysis size: lung fields 0.015-0.04, air or soft tissue < 0.006
_SUPERSAMPLE = np.array([-1.0 / 3.0, 0.0, 1.0 / 3.0])
_REJECTION_TRIES = 64


@dataclass(frozen=True)
class NoduleSpec:
    """One simulated nodule: an ellipsoid with in-plane semi-axes a, b and depth semi-axis c (px).

    ``angle`` (radians) turns the a axis from the column axis toward the row axis.  ``contrast``
    is the peak added attenuation (the centre's line integral, in the units of the intensity model
    of :func:`insert_nodule`); ``sigma`` is the Gaussian edge blur in px.  ``diameter_mm`` is the
    mean in-plane diameter, a + b px times the pixel spacing the spec was sampled for.  The depth c
    is kept for a complete physical description; the rendered thickness is normalised to peak 1,
    so c is already folded into ``contrast``.
    """

    row: float
    col: float
    a: float
    b: float
    c: float
    angle: float
    diameter_mm: float
    contrast: float
    sigma: float

    def __post_init__(self) -> None:
        if not (self.a > 0 and self.b > 0 and self.c > 0):
            raise ValueError(f"semi-axes must be positive, got a={self.a}, b={self.b}, c={self.c}")
        if not (self.contrast > 0 and self.sigma >= 0 and self.diameter_mm > 0):
            raise ValueError("contrast and diameter_mm must be positive and sigma non-negative")

    @property
    def diameter_px(self) -> float:
        """Mean in-plane diameter in pixels (a + b)."""
        return self.a + self.b

    @property
    def support_margin(self) -> float:
        """How far (px) beyond the ellipse the blurred map may be non-zero."""
        return SUPPORT_SIGMAS * self.sigma + 0.5


def _ellipse_q(spec: NoduleSpec, rows: np.ndarray, cols: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """(u/A)^2 + (v/B)^2 of points in the nodule's frame, A = a + grow, B = b + grow (<= 1: inside)."""
    dy = np.asarray(rows, dtype=np.float64) - spec.row
    dx = np.asarray(cols, dtype=np.float64) - spec.col
    cos, sin = math.cos(spec.angle), math.sin(spec.angle)
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    return (u / (spec.a + grow)) ** 2 + (v / (spec.b + grow)) ** 2


def _half_extent(spec: NoduleSpec, grow: float) -> tuple[float, float]:
    """Row and column half-extents of the (grown) rotated ellipse."""
    a, b = spec.a + grow, spec.b + grow
    cos, sin = math.cos(spec.angle), math.sin(spec.angle)
    return math.hypot(a * sin, b * cos), math.hypot(a * cos, b * sin)


def nodule_box(spec: NoduleSpec) -> tuple[int, int, int, int]:
    """Half-open pixel box (r0, r1, c0, c1) holding every pixel the nodule may change.

    It covers the blurred support, not just the ellipse, so ``image[r0:r1, c0:c1]`` is the whole
    window an insert touches.  It is not clipped to an image (a spec near an edge may give
    negative r0 or c0).
    """
    hr, hc = _half_extent(spec, spec.support_margin)
    return (
        math.floor(spec.row - hr),
        math.floor(spec.row + hr) + 1,
        math.floor(spec.col - hc),
        math.floor(spec.col + hc) + 1,
    )


def inside_nodule(spec: NoduleSpec, rows: np.ndarray | float, cols: np.ndarray | float) -> np.ndarray | bool:
    """Whether points (row, col) fall inside the nodule's in-plane ellipse (semi-axes a, b).

    Used to score localisation (e.g. the share of heatmap maxima on the lesion), so it uses the
    lesion itself, not its blurred halo.  Scalars give a bool, arrays a broadcast bool array.
    """
    inside = _ellipse_q(spec, np.asarray(rows), np.asarray(cols)) <= 1.0
    return bool(inside) if inside.ndim == 0 else inside


def nodule_mask(spec: NoduleSpec, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) bool: the pixels inside the nodule's ellipse, at least the pixel of its centre.

    The target of a localisation loss: where the lesion is, not its blurred halo; the centre
    pixel keeps a sub-pixel nodule from vanishing.
    """
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), dtype=bool)
    r0, r1, c0, c1 = nodule_box(spec)
    r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    if r1 > r0 and c1 > c0:
        rows = np.arange(r0, r1, dtype=np.float64)[:, None]
        cols = np.arange(c0, c1, dtype=np.float64)[None, :]
        out[r0:r1, c0:c1] = _ellipse_q(spec, rows, cols) <= 1.0
    r, c = round(spec.row), round(spec.col)
    if 0 <= r < h and 0 <= c < w:
        out[r, c] = True
    return out


def _as_2d(image: np.ndarray) -> np.ndarray:
    """A (H, W) view of a (H, W) or (H, W, 1) image."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, 1) image, got shape {arr.shape}")
    return arr


def _support(spec: NoduleSpec, shape: tuple[int, int]) -> tuple[int, int, int, int, np.ndarray]:
    """The nodule window clipped to ``shape`` and the pixels of the blurred support inside it."""
    r0, r1, c0, c1 = nodule_box(spec)
    r0, c0 = max(r0, 0), max(c0, 0)
    r1, c1 = min(r1, shape[0]), min(c1, shape[1])
    if r1 <= r0 or c1 <= c0:
        return r0, r0, c0, c0, np.zeros((0, 0), dtype=bool)
    rows = np.arange(r0, r1, dtype=np.float64)[:, None]
    cols = np.arange(c0, c1, dtype=np.float64)[None, :]
    return r0, r1, c0, c1, _ellipse_q(spec, rows, cols, grow=spec.support_margin) <= 1.0


def _render_window(shape: tuple[int, int], spec: NoduleSpec, rng: np.random.Generator) -> tuple[int, int, np.ndarray]:
    """The added attenuation in the nodule window only: (r0, c0, patch), zero outside the support."""
    r0, r1, c0, c1, support = _support(spec, shape)
    if support.size == 0 or not support.any():
        return r0, c0, np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
    h, w = r1 - r0, c1 - c0
    # Projected thickness of the ellipsoid, 2c sqrt(1 - q), normalised to 1 at the centre and
    # averaged over 3x3 sub-pixel samples so that a 3-px nodule is not a jagged blob.
    rows = np.arange(r0, r1, dtype=np.float64)[:, None, None, None] + _SUPERSAMPLE[None, None, :, None]
    cols = np.arange(c0, c1, dtype=np.float64)[None, :, None, None] + _SUPERSAMPLE[None, None, None, :]
    q = _ellipse_q(spec, rows, cols)
    thickness = np.sqrt(np.clip(1.0 - q, 0.0, None)).mean(axis=(2, 3))
    # Density varies smoothly within a real lesion: multiply by 1 + lowpass noise.
    noise = ndi.gaussian_filter(rng.standard_normal((h, w)), max(1.0, 0.35 * min(spec.a, spec.b)), mode="reflect")
    sd = float(noise.std())
    texture = 1.0 + TEXTURE_AMPLITUDE * (noise / sd if sd > 0 else noise)
    patch = thickness * np.clip(texture, 0.5, 1.5)
    if spec.sigma > 0:
        patch = ndi.gaussian_filter(patch, spec.sigma, mode="constant", cval=0.0, truncate=3.0)
    patch *= spec.contrast
    patch[~support] = 0.0
    return r0, c0, patch.astype(np.float32)


def render_nodule(shape: tuple[int, ...], spec: NoduleSpec, rng: np.random.Generator) -> np.ndarray:
    """The nodule's added attenuation as a float32 map of ``shape[:2]`` (zero outside its window).

    Thickness of the projected ellipsoid, t = 2c sqrt(1 - (u/a)^2 - (v/b)^2) normalised to peak 1,
    times ``spec.contrast``, times a low-frequency texture, blurred with ``spec.sigma``.  It is
    computed in the nodule window only; the peak of a small nodule falls below ``contrast`` after
    blurring, as partial-volume averaging does on a real film.
    """
    hw = (int(shape[0]), int(shape[1]))
    out = np.zeros(hw, dtype=np.float32)
    r0, c0, patch = _render_window(hw, spec, rng)
    out[r0 : r0 + patch.shape[0], c0 : c0 + patch.shape[1]] = patch
    return out


def insert_nodule(image: np.ndarray, spec: NoduleSpec, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``image`` with the nodule added; same shape and dtype, values in [0, 1].

    Intensity model: v_out = 1 - (1 - v) exp(-m), m the rendered attenuation.  1 - v is treated
    as an effective transmission of the processed film (dark = much X-ray got through), and an
    extra attenuator multiplies transmission by exp(-m).  Equivalently, with the linearised value
    u = -log(1 - v), the nodule adds m to u and maps back.  Why this rather than v + m: the display
    rendering of a radiograph compresses toward white, and a lesion over rib, heart or diaphragm
    shows less contrast than over lung.  This model gives v_out >= v, saturates smoothly below 1
    (never a clipped white disc), and raises the value by about (1 - v) m where m is small.
    Only pixels with m > 0 are written, so nothing outside the nodule window changes.
    """
    arr = np.asarray(image)
    img2d = _as_2d(arr)
    r0, c0, patch = _render_window(img2d.shape, spec, rng)
    out = arr.copy()
    out2d = _as_2d(out)
    changed = patch > 0
    if not changed.any():
        return out
    window = out2d[r0 : r0 + patch.shape[0], c0 : c0 + patch.shape[1]]
    v = window[changed].astype(np.float32)
    base = np.clip(v, 0.0, 1.0)
    new = 1.0 - (1.0 - base) * np.exp(-patch[changed])
    window[changed] = np.clip(np.maximum(new, v), 0.0, 1.0).astype(out.dtype)
    return out


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold on [0, 1] values (between-class variance maximised over a histogram)."""
    idx = np.minimum((np.clip(values, 0.0, 1.0) * bins).astype(np.intp), bins - 1)
    p = np.bincount(idx, minlength=bins).astype(np.float64)
    p /= p.sum()
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(bins))
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1.0 - w), 1e-12)
    return float(np.argmax(between) + 1) / bins


def _pick_lungs(mask: np.ndarray, mid: float, detail: np.ndarray) -> np.ndarray:
    """The largest lung-like connected component on each side of the midline (at most two).

    Lung-like: at least 1% of the area, at least 30% of the height tall and on average 8% of the
    width wide, centred between 25% and 65% of the height and within 30% of the width of the
    midline (a lung's centre lies about 20% out), and textured (ribs and vessels:
    high-pass SD >= ``_MIN_LUNG_DETAIL``).  These reject what the dark threshold also finds on
    odd films: outside air beside a small film, a strip between arm and chest wall, the neck, or
    smooth soft tissue below the diaphragm.
    """
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    h, w = mask.shape
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    best: dict[bool, tuple[int, int]] = {}
    for i, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None:
            continue
        height = box[0].stop - box[0].start
        if areas[i] < 0.01 * h * w or height < 0.3 * h or areas[i] < 0.08 * w * height:
            continue
        rows, cols = np.nonzero(lab[box] == i)
        centre_row, centre_col = box[0].start + rows.mean(), box[1].start + cols.mean()
        if not (0.25 * h <= centre_row <= 0.65 * h and abs(centre_col - mid) <= 0.3 * w):
            continue
        if float(detail[box][rows, cols].std()) < _MIN_LUNG_DETAIL:
            continue
        side = bool(centre_col < mid)
        if side not in best or areas[i] > best[side][1]:
            best[side] = (i, int(areas[i]))
    keep = np.zeros(n + 1, dtype=bool)
    for i, _ in best.values():
        keep[i] = True
    return keep[lab]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with enclosed holes filled (background components not touching the border)."""
    lab, n = ndi.label(~mask)
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        outside[edge] = True
    outside[0] = True  # label 0 is the mask itself
    hole = ~outside
    hole[0] = False
    return mask | hole[lab]


def _content_box(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box of the non-padded area (letterbox padding is exact zeros)."""
    rows = np.flatnonzero(img.max(axis=1) > 1e-6)
    cols = np.flatnonzero(img.max(axis=0) > 1e-6)
    if rows.size == 0 or cols.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _odd(n: float) -> int:
    """An odd filter size of at least 3 from a length in px."""
    return 2 * max(1, round(n / 2)) + 1


def _lung_mask_core(sub: np.ndarray) -> np.ndarray:
    """Lung fields (not yet eroded) of a frontal chest film that fills ``sub`` (no padding)."""
    h, w = sub.shape
    size = max(h, w)
    empty = np.zeros((h, w), dtype=bool)
    smooth = ndi.gaussian_filter(sub, 0.01 * size, truncate=3.0)
    # Midline: the brightest column band (spine and mediastinum) in the central third at lung height.
    profile = smooth[int(0.2 * h) : int(0.7 * h), int(0.35 * w) : int(0.65 * w)].mean(axis=0)
    if profile.size == 0:
        return empty
    mid = int(0.35 * w) + int(np.argmax(ndi.uniform_filter1d(profile, max(3, int(0.04 * w)))))
    # Where lungs can be on a frontal adult film: rows 13-84% of the height, lateral extent from
    # 20% of the width beside the midline at the apex widening to 43% by mid-lung, and not within
    # 4% of the midline (mediastinum).  The taper keeps the dark supraclavicular fossae and
    # shoulders out; the lateral limit keeps most of the outside air out.
    top, bottom = 0.13, 0.84
    v = ((np.arange(h) + 0.5) / h - top) / (bottom - top)
    lateral = np.where((v >= 0) & (v <= 1), 0.20 + 0.23 * np.clip(v / 0.45, 0.0, 1.0), 0.0)
    offset = np.abs((np.arange(w) + 0.5 - mid) / w)
    prior = (offset[None, :] < lateral[:, None]) & (offset[None, :] > 0.04)
    edge = int(0.06 * w)  # the outer chest wall (or outside air on a small film) is never lung
    prior[:, :edge] = False
    prior[:, w - edge :] = False
    if not prior.any():
        return empty
    # Lungs are the dark class of the thorax region (mediastinum, soft tissue and bone are brighter).
    inside = smooth[prior]
    threshold = _otsu(inside)
    dark_values, bright_values = inside[inside < threshold], inside[inside >= threshold]
    if dark_values.size == 0 or bright_values.size == 0 or bright_values.mean() - dark_values.mean() < 0.05:
        return empty  # no dark-lung contrast: not a chest film this heuristic can read
    lungs = prior & (smooth < threshold)
    # Outside air is far darker than aerated lung: remove what is below half the lung level and
    # connected to the image edge, with a margin (the chest wall).
    air = smooth < 0.5 * float(np.median(smooth[lungs]))
    lab, n = ndi.label(air)
    at_edge = np.zeros(n + 1, dtype=bool)
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        at_edge[edge] = True
    at_edge[0] = False
    lungs &= ~ndi.maximum_filter(at_edge[lab], size=_odd(0.06 * size))
    # Opening breaks thin bridges into shoulders and axillae; then one lung-like component per side.
    k = _odd(0.03 * size)
    lungs = ndi.maximum_filter(ndi.minimum_filter(lungs, size=k), size=k)
    lungs = _pick_lungs(lungs, mid, sub - smooth)
    return _fill_holes(lungs)  # vessels, nipples or a real nodule leave holes


def lung_mask(image: np.ndarray) -> np.ndarray:
    """Heuristic lung fields of a frontal chest film as a bool (H, W) array (may be all False).

    No segmentation model is available, so this estimates: smooth; find the midline; restrict to
    where lungs lie on an adult PA/AP film of the non-padded area; keep the dark class (Otsu) minus
    outside air; open; keep the largest lung-like component on each side; fill holes; erode.  It is meant
    for placing synthetic nodules, so it errs toward missing lung rather than including non-lung.
    Letterbox padding and the outer border are never included.  The analysis runs on a block
    average to about 112 px (lungs are large; half the cost at 224 px) and the result is
    eroded at full resolution.
    """
    img = _as_2d(image)
    out = np.zeros(img.shape, dtype=bool)
    box = _content_box(img)
    if box is None:
        return out
    r0, r1, c0, c1 = box
    sub = img[r0:r1, c0:c1].astype(np.float32)
    size = max(sub.shape)
    factor = max(1, round(size / _ANALYSIS_SIZE))
    hh, ww = sub.shape[0] // factor, sub.shape[1] // factor
    if min(hh, ww) < 16:
        return out
    small = sub[: hh * factor, : ww * factor].reshape(hh, factor, ww, factor).mean(axis=(1, 3))
    core = _lung_mask_core(small)
    if factor > 1:
        core = np.repeat(np.repeat(core, factor, axis=0), factor, axis=1)
    out[r0 : r0 + core.shape[0], c0 : c0 + core.shape[1]] = core
    # Erode so that anything placed inside stays clear of the (uncertain) lung edge.
    out = ndi.minimum_filter(out, size=_odd(0.03 * size), mode="constant", cval=False)
    out[[0, -1], :] = False
    out[:, [0, -1]] = False
    return out


def _fits(mask: np.ndarray, spec: NoduleSpec) -> bool:
    """Whether the nodule's whole blurred support lies inside the image and inside ``mask``."""
    r0, r1, c0, c1 = nodule_box(spec)
    if r0 < 0 or c0 < 0 or r1 > mask.shape[0] or c1 > mask.shape[1]:
        return False
    _, _, _, _, support = _support(spec, mask.shape)
    return bool(np.all(mask[r0:r1, c0:c1][support]))


def _with_centre(spec: NoduleSpec, row: float, col: float) -> NoduleSpec:
    return NoduleSpec(row, col, spec.a, spec.b, spec.c, spec.angle, spec.diameter_mm, spec.contrast, spec.sigma)


def _check_range(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (0 < lo <= hi):
        raise ValueError(f"{name} must be a (lo, hi) range with 0 < lo <= hi, got {bounds}")
    return lo, hi


def sample_nodule(
    mask: np.ndarray,
    rng: np.random.Generator,
    spacing_mm: float = DEFAULT_SPACING_MM,
    diameter_mm: tuple[float, float] = DEFAULT_DIAMETER_MM,
    contrast: tuple[float, float] = DEFAULT_CONTRAST,
) -> NoduleSpec | None:
    """Draw a nodule whose whole blurred footprint lies inside ``mask``; None if none can fit.

    Diameter is log-uniform in ``diameter_mm`` (small nodules are commoner than large masses) and
    converted to px with ``spacing_mm``; ellipticity up to ``MAX_ELLIPTICITY``, any rotation.
    Contrast is log-uniform in ``contrast``, its quantile tilted toward the size quantile by
    ``SIZE_CONTRAST_TILT`` (a thicker lesion attenuates more).  The shape is drawn before the
    centre, so the same seed at another spacing gives the same nodule scaled.  The centre is uniform
    over the mask pixels where the footprint fits, by rejection from uniform mask pixels (with
    sub-pixel jitter); if that keeps failing, the exact set of fitting centres is computed by erosion.
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    d_lo, d_hi = _check_range("diameter_mm", diameter_mm)
    k_lo, k_hi = _check_range("contrast", contrast)
    m = np.asarray(_as_2d(np.asarray(mask)), dtype=bool)

    size_q = float(rng.random())
    diameter = d_lo * (d_hi / d_lo) ** size_q
    radius = diameter / spacing_mm / 2.0
    ellipticity = float(rng.uniform(0.0, MAX_ELLIPTICITY))
    a, b = radius * (1.0 + ellipticity), radius * (1.0 - ellipticity)
    c = radius * float(rng.uniform(0.85, 1.15))
    angle = float(rng.uniform(0.0, math.pi))
    peak = k_lo * (k_hi / k_lo) ** (SIZE_CONTRAST_TILT * size_q + (1.0 - SIZE_CONTRAST_TILT) * float(rng.random()))
    sigma = max(MIN_SIGMA_PX, float(rng.uniform(*EDGE_BLUR_MM)) / spacing_mm)
    shape_only = NoduleSpec(0.0, 0.0, a, b, c, angle, diameter, peak, sigma)

    candidates = np.flatnonzero(m)
    footprint_area = math.pi * (a + shape_only.support_margin) * (b + shape_only.support_margin)
    if candidates.size < 0.8 * footprint_area:
        return None
    width = m.shape[1]
    for _ in range(_REJECTION_TRIES):
        index = int(candidates[rng.integers(candidates.size)])
        jitter = rng.uniform(-0.5, 0.5, size=2)
        spec = _with_centre(shape_only, index // width + float(jitter[0]), index % width + float(jitter[1]))
        if _fits(m, spec):
            return spec
    # Few centres fit: find all of them at once (integer centres, so the footprint is symmetric).
    r0, r1, c0, c1 = nodule_box(shape_only)
    hr, hc = max(-r0, r1 - 1), max(-c0, c1 - 1)
    rows = np.arange(-hr, hr + 1, dtype=np.float64)[:, None]
    cols = np.arange(-hc, hc + 1, dtype=np.float64)[None, :]
    footprint = _ellipse_q(shape_only, rows, cols, grow=shape_only.support_margin) <= 1.0
    valid = np.flatnonzero(ndi.binary_erosion(m, structure=footprint, border_value=0))
    if valid.size == 0:
        return None
    index = int(valid[rng.integers(valid.size)])
    spec = _with_centre(shape_only, float(index // width), float(index % width))
    return spec if _fits(m, spec) else None


def add_synthetic_nodule(
    image: np.ndarray,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
    spacing_mm: float = DEFAULT_SPACING_MM,
    diameter_mm: tuple[float, float] = DEFAULT_DIAMETER_MM,
    contrast: tuple[float, float] = DEFAULT_CONTRAST,
) -> tuple[np.ndarray, NoduleSpec | None]:
    """Sample and insert one nodule inside the lung fields: (new image, spec).

    ``mask`` defaults to :func:`lung_mask` of the image (pass a cached one to save its cost).
    When no nodule fits, the input image itself is returned unchanged with None, so a caller can
    keep the sample's original label.
    """
    img2d = _as_2d(np.asarray(image))
    m = lung_mask(img2d) if mask is None else _as_2d(np.asarray(mask))
    if m.shape != img2d.shape:
        raise ValueError(f"mask shape {m.shape} does not match image shape {img2d.shape}")
    spec = sample_nodule(m, rng, spacing_mm=spacing_mm, diameter_mm=diameter_mm, contrast=contrast)
    if spec is None:
        return image, None
    return insert_nodule(image, spec, rng), spec
