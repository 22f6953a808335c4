"""Grey-level transforms of the pixel path: Modality LUT, VOI LUT, inversion (PS3.3 C.11).

Everything here takes arrays and header values and returns arrays, so the order of the
steps lives in one place (``pixels.py``) and each step can be tested on its own.

Speed: on a 2500x2048 frame every full-resolution pass costs several milliseconds, so
the common case (Rescale Slope/Intercept, a LINEAR or LINEAR_EXACT window or a
percentile window, then optional MONOCHROME1 inversion) is folded into ONE multiply-add
followed by one clip.  Each of those steps is affine on the unclipped range, so composing
them gives the same numbers as applying them one after another; the steps are still
recorded separately in ``PixelResult.steps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Percentiles of the automatic window for images that carry no VOI (PS3.3 C.11.2 leaves
# the rendering to the application).  1/99 ignores collimator edges and burned-in text.
PERCENTILE_LOW = 1.0
PERCENTILE_HIGH = 99.0
# About this many pixels are sampled (regular grid) for the percentiles: 0.5 ms instead
# of tens of milliseconds, and the window moves by well under one grey level.
PERCENTILE_SAMPLES = 65536


@dataclass(frozen=True)
class Lut:
    """A Modality or VOI LUT (PS3.3 C.11.1.1 / C.11.2.1.1): descriptor plus table."""

    first_mapped: int
    table: np.ndarray  # 1-D, integer
    bits: int

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Values below the first mapped one take entry 0, above the last the last entry."""
        idx = np.asarray(values, dtype=np.int64) - self.first_mapped
        np.clip(idx, 0, self.table.size - 1, out=idx)
        return np.take(self.table, idx)


@dataclass(frozen=True)
class Window:
    """The VOI actually used, recorded with every result.

    ``source`` is "VOI LUT Sequence", "Window Center/Width", "percentile" or "full range";
    for percentile and full-range windows ``center``/``width`` are the LINEAR_EXACT
    equivalent in modality-output units.
    """

    source: str
    function: str  # LINEAR, LINEAR_EXACT, SIGMOID or LUT
    center: float | None = None
    width: float | None = None


def read_lut(item: Any, little_endian: bool = True) -> Lut:
    """Parse one LUT item: (0028,3002) LUT Descriptor and (0028,3006) LUT Data.

    LUT Data is US (a list) or OW (raw bytes) depending on the encoding; a first entry of
    0 in the descriptor means 65536 entries.
    """
    desc = [int(v) for v in item.LUTDescriptor]
    if len(desc) != 3:
        raise ValueError(f"LUT Descriptor must have 3 values, got {desc}")
    n_entries, first, bits = desc
    n_entries = n_entries or 65536
    data = item.LUTData
    if isinstance(data, bytes | bytearray | memoryview):
        table = np.frombuffer(bytes(data), dtype="<u2" if little_endian else ">u2")
    elif isinstance(data, int):
        table = np.asarray([data], dtype=np.int64)
    else:
        table = np.asarray(list(data), dtype=np.int64)
    table = table[:n_entries].astype(np.int64)
    if table.size == 0:
        raise ValueError("empty LUT Data")
    # First Mapped may be written unsigned for signed data (PS3.3 C.11.1.1.1).
    return Lut(first_mapped=first, table=table, bits=bits if bits > 0 else 16)


def first_number(value: Any) -> float | None:
    """First value of a possibly multi-valued DS (several windows: we use the first)."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        seq: list[Any] = [value]
    else:
        seq = list(value)
    if not seq:
        return None
    try:
        num = float(seq[0])
    except (TypeError, ValueError):
        return None
    return num if math.isfinite(num) else None


def header_window(center: Any, width: Any, function: Any) -> Window | None:
    """(0028,1050) Window Center, (0028,1051) Window Width, (0028,1056) VOI LUT Function.

    Returns None when absent or unusable (width must be >= 1 for LINEAR, > 0 otherwise),
    so the caller falls back to the percentile window instead of rendering garbage.
    """
    c, w = first_number(center), first_number(width)
    if c is None or w is None:
        return None
    func = str(function or "LINEAR").strip().upper() or "LINEAR"
    if func not in {"LINEAR", "LINEAR_EXACT", "SIGMOID"}:
        func = "LINEAR"
    if (func == "LINEAR" and w < 1) or w <= 0:
        return None
    return Window(source="Window Center/Width", function=func, center=c, width=w)


def window_affine(window: Window) -> tuple[float, float]:
    """(a, b) with output = clip(a*x + b, 0, 1) for a LINEAR or LINEAR_EXACT window.

    LINEAR (PS3.3 C.11.2.1.2.1): y = ((x - (c - 0.5)) / (w - 1) + 0.5); at w == 1 that is a
    step, approximated by a very steep ramp.  LINEAR_EXACT (C.11.2.1.3.2): y = (x - c)/w + 0.5.
    """
    assert window.center is not None and window.width is not None
    c, w = window.center, window.width
    if window.function == "LINEAR":
        denom = max(w - 1.0, 1e-3)
        a = 1.0 / denom
        return a, 0.5 - (c - 0.5) * a
    a = 1.0 / w
    return a, 0.5 - c * a


def sigmoid(values: np.ndarray, window: Window) -> np.ndarray:
    """SIGMOID VOI LUT Function (PS3.3 C.11.2.1.3.1), output in (0, 1)."""
    assert window.center is not None and window.width is not None
    out = np.asarray(values, dtype=np.float32) - np.float32(window.center)
    out *= np.float32(-4.0 / window.width)
    np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def padding_mask(sample: np.ndarray, padding_value: Any, padding_limit: Any) -> np.ndarray | None:
    """True where a stored value is padding: (0028,0120) Pixel Padding Value and
    (0028,0121) Pixel Padding Range Limit, both in stored-value space."""
    pv = first_number(padding_value)
    if pv is None:
        return None
    pl = first_number(padding_limit)
    if pl is None:
        return sample == pv
    lo, hi = min(pv, pl), max(pv, pl)
    return (sample >= lo) & (sample <= hi)


def subsample(arr: np.ndarray, target: int = PERCENTILE_SAMPLES) -> np.ndarray:
    """A regular grid of about `target` pixels: a view, no copy of the full frame."""
    step = max(1, int(math.sqrt(arr.size / target)))
    return arr[::step, ::step]


def percentile_window(values: np.ndarray, source: str = "percentile") -> Window:
    """LINEAR_EXACT window spanning the 1st..99th percentile of `values` (already sampled
    and stripped of padding, in modality-output units).  Flat images get min..max, and a
    truly constant image a unit window so the output is defined (all 0.5 -> all 0 or 1)."""
    flat = np.asarray(values, dtype=np.float32).ravel()
    if flat.size == 0:
        return Window(source=source, function="LINEAR_EXACT", center=0.5, width=1.0)
    lo, hi = (float(v) for v in np.percentile(flat, [PERCENTILE_LOW, PERCENTILE_HIGH]))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return Window(source=source, function="LINEAR_EXACT", center=lo + 0.5, width=1.0)
    return Window(source=source, function="LINEAR_EXACT", center=(lo + hi) / 2.0, width=hi - lo)


def affine_clip(arr: np.ndarray, a: float, b: float) -> np.ndarray:
    """float32 clip(a*arr + b, 0, 1) in two passes over the frame plus the clip.

    Writing the product straight into a float32 buffer avoids both a float64 temporary
    and a separate astype pass.
    """
    out = np.empty(arr.shape, dtype=np.float32)
    np.multiply(arr, np.float32(a), out=out, dtype=np.float32, casting="unsafe")
    out += np.float32(b)
    np.clip(out, 0.0, 1.0, out=out)
    return out
