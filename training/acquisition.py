"""Acquisition augmentation: make every collection look like every other one to the model.

Our collections differ less in anatomy than in how the film reached us: RSNA normals were
shrunk twice and saved as JPEG q95, NIH findings are 512 px PNGs, the COVID collections are
screenshots of varied contrast, Kermany was stretched to a square.  A model that sees those
differences only on one side of a label learns the collection instead of the disease, and
then sits at chance on another hospital's films.  So every training image, whatever its
collection, randomly gets each of the things that distinguish collections: a tone curve
(gamma), blur or sharpening, sensor-like noise, JPEG re-compression, a down- and
up-sampling round trip and a border change (crop or wider letterbox).

Never a horizontal flip (situs and side markers: see ``models.architectures.AugmentConfig``).
Applied to the pixel-path tensor (float32 [0, 1], 0 = air), on the CPU, per image, after any
synthetic nodule is inserted (a nodule is anatomy and must pass through the same
acquisition as the film around it).  Validation and test images are never augmented.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class AcquisitionConfig:
    """Probabilities and ranges of each acquisition change (all off with ``p_* = 0``)."""

    p_gamma: float = 0.7
    gamma: tuple[float, float] = (0.7, 1.45)
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    p_sharpen: float = 0.2
    sharpen_percent: tuple[int, int] = (30, 120)
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (0.003, 0.02)
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (60, 96)
    p_resample: float = 0.5
    resample_scale: tuple[float, float] = (0.35, 0.9)
    p_border: float = 0.3
    border_fraction: tuple[float, float] = (0.0, 0.08)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> AcquisitionConfig | None:
        if data is None:
            return None
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def _from_pil(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def gamma(img: np.ndarray, g: float) -> np.ndarray:
    """Tone curve: collections differ most in how they map exposure to grey."""
    return np.power(np.clip(img, 0.0, 1.0), np.float32(g)).astype(np.float32)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as 8-bit JPEG: block artefacts are the RSNA normals' signature."""
    buf = io.BytesIO()
    _to_pil(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return _from_pil(Image.open(buf))


def resample_roundtrip(img: np.ndarray, scale: float) -> np.ndarray:
    """Down to ``scale`` and back up (bilinear): the detail lost by a third party's resizing."""
    h, w = img.shape
    small = (max(8, round(w * scale)), max(8, round(h * scale)))
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    out = im.resize(small, Image.Resampling.BILINEAR, reducing_gap=2.0).resize((w, h), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur in float (Pillow blurs only 8-bit images): softer detectors and grids."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(img, dtype=np.float32), sigma, mode="nearest")


def sharpen(img: np.ndarray, percent: int) -> np.ndarray:
    """Unsharp mask, as CR/DX processing applies edge enhancement at varying strength."""
    out = _to_pil(img).filter(ImageFilter.UnsharpMask(radius=2, percent=int(percent), threshold=0))
    return _from_pil(out)


def border(img: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Black out a band on one or two sides: collimation and letterbox widths differ by site."""
    h, w = img.shape
    out = img.copy()
    n = round(fraction * min(h, w))
    if n <= 0:
        return out
    side = int(rng.integers(0, 4))
    if side == 0:
        out[:n] = 0.0
    elif side == 1:
        out[-n:] = 0.0
    elif side == 2:
        out[:, :n] = 0.0
        out[:, -n:] = 0.0
    else:
        out[:n] = 0.0
        out[-n:] = 0.0
    return out


def augment_image(img: np.ndarray, cfg: AcquisitionConfig, rng: np.random.Generator) -> np.ndarray:
    """One acquisition draw for a 2-D float32 [0, 1] image (new array; the input is not changed)."""
    out = np.asarray(img, dtype=np.float32)
    if rng.random() < cfg.p_gamma:
        out = gamma(out, _uniform(rng, cfg.gamma))
    if rng.random() < cfg.p_resample:
        out = resample_roundtrip(out, _uniform(rng, cfg.resample_scale))
    if rng.random() < cfg.p_blur:
        out = blur(out, _uniform(rng, cfg.blur_sigma))
    elif rng.random() < cfg.p_sharpen:
        out = sharpen(out, int(rng.integers(cfg.sharpen_percent[0], cfg.sharpen_percent[1] + 1)))
    if rng.random() < cfg.p_noise:
        out = out + rng.normal(0.0, _uniform(rng, cfg.noise_sigma), out.shape).astype(np.float32)
    if rng.random() < cfg.p_border:
        out = border(out, _uniform(rng, cfg.border_fraction), rng)
    if rng.random() < cfg.p_jpeg:
        out = jpeg_roundtrip(out, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def augment_batch(x: np.ndarray, cfg: AcquisitionConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, H, W, 1) float32 batch, each image with its own draw."""
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(len(x)):
        out[i, ..., 0] = augment_image(x[i, ..., 0], cfg, rng)
    return out
