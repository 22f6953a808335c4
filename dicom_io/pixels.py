"""The one pixel path: DICOM, PNG or JPEG -> the float32 tensor every model consumes.

Training (PNG/JPEG datasets) and serving (DICOM from the PACS) call the same
``to_model_tensor`` so the models never see two renderings of one radiograph.  The steps,
in order, and the DICOM attributes each reads, are documented in docs/pixel-path.md:

1. decode the first frame (Transfer Syntax UID, Image Pixel module)      -> decode.py
2. bits-stored masking (Bits Stored, Pixel Representation)
3. Modality LUT (Modality LUT Sequence, else Rescale Slope/Intercept)    -> voi.py
4. VOI LUT (VOI LUT Sequence, else Window Center/Width + VOI LUT Function,
   else a 1..99 percentile window excluding Pixel Padding Value/Range)  -> voi.py
5. MONOCHROME1 inversion, after VOI
6. colour (RGB/YBR) to luminance
7. letterbox resize to the model input                                    -> resize.py

Output: float32 in [0, 1], 0 = black (air, lungs), 1 = white (bone, metal).  Any change
to what these steps produce must bump ``PIPELINE_VERSION``: model cards record it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_io.decode import Decoded, Source, decode
from dicom_io.resize import fit_within, letterbox
from dicom_io.voi import (
    PERCENTILE_HIGH,
    PERCENTILE_LOW,
    Lut,
    Window,
    affine_clip,
    header_window,
    padding_mask,
    percentile_window,
    read_lut,
    sigmoid,
    subsample,
    window_affine,
)
from worker.config import PixelsConfig

PIPELINE_VERSION = "xtpx-1"
DEFAULT_INPUT_SIZE = 224
DEFAULT_DISPLAY_SIZE = 1024
# ITU-R BT.601 luma, the weights JPEG's YCbCr (and so YBR_FULL) is defined with.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class PixelResult:
    """The rendered frame before resizing, with what was done to it (stored per result)."""

    image: np.ndarray  # 2-D float32 in [0, 1], lungs dark / bone bright
    kind: str  # "dicom", "png" or "jpeg"
    photometric: str  # as stored (MONOCHROME1, MONOCHROME2, RGB, ...)
    frames: int
    frame_used: int
    window: Window
    steps: tuple[str, ...]
    transfer_syntax: str | None
    pipeline_version: str = PIPELINE_VERSION

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.image.shape[0]), int(self.image.shape[1]))


def load_image(source: Source | PixelResult, limits: PixelsConfig | None = None) -> PixelResult:
    """Decode and render the first frame to float32 [0, 1] at full resolution."""
    if isinstance(source, PixelResult):
        return source
    return render(decode(source, limits))


def to_model_tensor(
    source: Source | PixelResult, size: int = DEFAULT_INPUT_SIZE, limits: PixelsConfig | None = None
) -> np.ndarray:
    """(size, size, 1) float32 in [0, 1]: the exact input of every model, letterboxed."""
    return letterbox(load_image(source, limits).image, size)[..., np.newaxis]


def render_display(
    source: Source | PixelResult, max_size: int = DEFAULT_DISPLAY_SIZE, limits: PixelsConfig | None = None
) -> np.ndarray:
    """uint8 2-D image for the worklist viewer: same rendering, longer side <= max_size,
    aspect kept, no padding, never upscaled."""
    image = fit_within(load_image(source, limits).image, max_size)
    out = np.multiply(image, 255.0, dtype=np.float32)
    out += 0.5
    return out.astype(np.uint8)


def mask_bits(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Keep only the Bits Stored low bits: unused high bits may hold overlays or garbage.

    Unsigned: AND with the mask.  Signed: shift left then arithmetic shift right, which
    also sign-extends (e.g. 12-bit two's complement in a 16-bit container).  In place.
    """
    container = arr.dtype.itemsize * 8
    if not np.issubdtype(arr.dtype, np.integer) or bits_stored >= container:
        return arr
    if signed:
        shift = container - bits_stored
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    else:
        np.bitwise_and(arr, arr.dtype.type((1 << bits_stored) - 1), out=arr)
    return arr


def luminance(rgb: np.ndarray) -> tuple[np.ndarray, str]:
    """Grey stored as RGB gives its one channel unchanged; true colour gives BT.601 luma."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(g, b):
        return r, "colour: grey stored as RGB, one channel used"
    out = np.multiply(r, np.float32(LUMA_WEIGHTS[0]), dtype=np.float32)
    out += np.multiply(g, np.float32(LUMA_WEIGHTS[1]), dtype=np.float32)
    out += np.multiply(b, np.float32(LUMA_WEIGHTS[2]), dtype=np.float32)
    return out, "colour: RGB to luminance (BT.601)"


def _full_range(bits: int) -> Window:
    top = float((1 << bits) - 1)
    return Window(source="full range", function="LINEAR_EXACT", center=top / 2.0, width=top)


def _decode_step(dec: Decoded) -> str:
    if dec.kind != "dicom":
        return f"decode: {dec.kind.upper()} ({dec.array.dtype}, {dec.photometric})"
    from pydicom.uid import UID

    ts = UID(dec.transfer_syntax or "")
    return f"decode: DICOM {ts.name} ({ts})"


def render(dec: Decoded) -> PixelResult:
    """Steps 2-6 on a decoded frame; see the module docstring for the order."""
    steps = [_decode_step(dec)]
    if dec.frames > 1:
        steps.append(f"multi-frame: frame {dec.frame_used + 1} of {dec.frames} used")
    if dec.array.ndim == 3:
        image, window = _render_colour(dec, steps)
    else:
        image, window = _render_grey(dec, steps)
    steps.append("output: float32 [0, 1], 0 black (air), 1 white (bone)")
    return PixelResult(
        image=image,
        kind=dec.kind,
        photometric=dec.photometric,
        frames=dec.frames,
        frame_used=dec.frame_used,
        window=window,
        steps=tuple(steps),
        transfer_syntax=dec.transfer_syntax,
    )


def _render_colour(dec: Decoded, steps: list[str]) -> tuple[np.ndarray, Window]:
    """Colour images are display-ready (no Modality/VOI LUT applies to them): full range,
    then luma.  Both are linear, so computing luma first gives the same numbers cheaper."""
    bits = dec.bits_stored if dec.kind == "dicom" else 8
    window = _full_range(bits)
    lum, step = luminance(mask_bits(dec.array, bits, False) if dec.kind == "dicom" else dec.array)
    a, b = window_affine(window)
    steps.append(f"VOI: full range 0..{(1 << bits) - 1}")
    steps.append(step)
    return affine_clip(lum, a, b), window


def _render_grey(dec: Decoded, steps: list[str]) -> tuple[np.ndarray, Window]:
    ds = dec.header
    arr = dec.array
    if ds is not None:
        container = arr.dtype.itemsize * 8
        arr = mask_bits(arr, dec.bits_stored, dec.signed)
        if dec.bits_stored < container:
            steps.append(f"bits stored: low {dec.bits_stored} of {container} bits kept")
    little = True
    if ds is not None:
        from dicom_io.decode import transfer_syntax

        little = transfer_syntax(ds).is_little_endian

    # Step 3: Modality LUT.
    mlut: Lut | None = None
    slope, intercept = 1.0, 0.0
    if ds is not None and ds.get("ModalityLUTSequence"):
        mlut = read_lut(ds.ModalityLUTSequence[0], little)
        steps.append("modality LUT: Modality LUT Sequence")
    elif ds is not None and ("RescaleSlope" in ds or "RescaleIntercept" in ds):
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        steps.append(f"modality LUT: Rescale Slope {slope:g}, Intercept {intercept:g}")

    # Step 4: VOI.
    voi_lut: Lut | None = None
    window: Window | None = None
    if ds is not None and ds.get("VOILUTSequence"):
        voi_lut = read_lut(ds.VOILUTSequence[0], little)
        window = Window(source="VOI LUT Sequence", function="LUT")
        steps.append("VOI: VOI LUT Sequence (first)")
    elif ds is not None:
        window = header_window(ds.get("WindowCenter"), ds.get("WindowWidth"), ds.get("VOILUTFunction"))
        if window is not None:
            steps.append(f"VOI: Window Center {window.center:g} / Width {window.width:g} {window.function} (first)")
    if window is None and ds is None and arr.dtype == np.uint8:
        window = _full_range(8)
        steps.append("VOI: none in a header-less 8-bit image: full range 0..255 (already rendered for display)")
    if window is None:
        window = _auto_window(arr, ds, mlut, slope, intercept)
        steps.append(
            f"VOI: percentile {PERCENTILE_LOW:g}-{PERCENTILE_HIGH:g} window, centre {window.center:g} "
            f"width {window.width:g} (Pixel Padding excluded)"
        )

    # Step 5 decided here, applied with the VOI (composed) or after it.
    invert = dec.photometric == "MONOCHROME1"
    if voi_lut is None and mlut is None and window.function != "SIGMOID":
        a, b = window_affine(window)
        a, b = a * slope, a * intercept + b
        if invert:
            a, b = -a, 1.0 - b
        out = affine_clip(arr, a, b)
    else:
        values = mlut.apply(arr) if mlut is not None else _rescale(arr, slope, intercept)
        if voi_lut is not None:
            top = float((1 << voi_lut.bits) - 1)
            out = voi_lut.apply(np.rint(values)).astype(np.float32)
            out *= np.float32(1.0 / top)
            np.clip(out, 0.0, 1.0, out=out)
        elif window.function == "SIGMOID":
            out = sigmoid(values, window)
        else:
            a, b = window_affine(window)
            out = affine_clip(values, a, b)
        if invert:
            np.subtract(np.float32(1.0), out, out=out)
    if invert:
        steps.append("MONOCHROME1: inverted after VOI")
    return out, window


def _rescale(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if slope == 1.0 and intercept == 0.0:
        return arr
    out = np.multiply(arr, np.float32(slope), dtype=np.float32)
    out += np.float32(intercept)
    return out


def _auto_window(arr: np.ndarray, ds: object, mlut: Lut | None, slope: float, intercept: float) -> Window:
    """Percentile window on a sampled grid, stored padding values excluded, in
    modality-output units (so it composes with Rescale Slope/Intercept like a header one)."""
    sample = subsample(arr)
    if ds is not None:
        mask = padding_mask(sample, ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit"))  # type: ignore[attr-defined]
        if mask is not None and not mask.all():
            sample = sample[~mask]
    values = mlut.apply(sample) if mlut is not None else _rescale(sample, slope, intercept)
    return percentile_window(np.asarray(values))
