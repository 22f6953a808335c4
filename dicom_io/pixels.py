"""The one pixel path: DICOM, PNG or JPEG -> the float32 tensor every model consumes.

Training (PNG/JPEG datasets) and serving (DICOM from the PACS) call the same
``to_model_tensor`` so the models never see two renderings of one radiograph.  The steps,
in order, and the DICOM attributes each reads, are documented in docs/pixel-path.md:

1. decode the first frame (Transfer Syntax UID, Image Pixel module)      -> decode.py
   for the model, a JPEG 2000 or JPEG frame only down to the resolution it needs
   (at least twice the input size along the longer side)                -> reduced.py
2. bits-stored masking (Bits Stored, Pixel Representation)
3. Modality LUT (Modality LUT Sequence, else Rescale Slope/Intercept)    -> voi.py
4. VOI LUT (VOI LUT Sequence, else Window Center/Width + VOI LUT Function,
   else a 1..99 percentile window excluding Pixel Padding Value/Range)  -> voi.py
   One rule for every image without a VOI, whatever it arrives in: a DICOM without VOI
   attributes, a PNG, a JPEG, grey or colour, all get the percentile window, so the same
   pixels give the same tensor as a PNG in training and as a DICOM at the PACS.
5. MONOCHROME1 inversion, after VOI
6. colour (RGB/YBR) to luminance
7. letterbox resize to the model input                                    -> resize.py

Output: float32 in [0, 1], 0 = black (air, lungs), 1 = white (bone, metal).  Any change
to what these steps produce must bump ``PIPELINE_VERSION``: model cards record it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_io.decode import Decoded, Source, decode, transfer_syntax
from dicom_io.resize import Transform, apply_in_strips, fit_within_transformed, letterbox_transformed
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
from settings import PixelsConfig

PIPELINE_VERSION = "xtpx-3"
# Earlier versions whose models need no retraining: xtpx-3 only added the reduced-resolution
# decode of JPEG 2000 / JPEG DICOM frames (within the tolerance tests/test_reduced_decode.py
# holds); PNG and JPEG files, all the training data, give bit-identical tensors.
COMPATIBLE_VERSIONS = frozenset({"xtpx-2", PIPELINE_VERSION})
# The model tensor is made from an image at least this many times its size (reduced decoding).
REDUCED_DECODE_MARGIN = 2
DEFAULT_INPUT_SIZE = 224
DEFAULT_DISPLAY_SIZE = 1024
# ITU-R BT.601 luma, the weights JPEG's YCbCr (and so YBR_FULL) is defined with.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class PixelResult:
    """The rendered frame before resizing, with what was done to it (stored per result).

    ``image`` is computed on first access: the model path resizes straight from the
    decoded ``pixels`` through ``transform`` (steps 2-6, elementwise) strip by strip, so
    a 2500x2048 frame never has to exist as a full float32 copy.  Both routes give
    bit-identical tensors.
    """

    kind: str  # "dicom", "png" or "jpeg"
    photometric: str  # as stored (MONOCHROME1, MONOCHROME2, RGB, ...)
    frames: int
    frame_used: int
    window: Window
    steps: tuple[str, ...]
    transfer_syntax: str | None
    pixels: np.ndarray = field(repr=False)  # first frame as decoded, before step 2
    transform: Transform = field(repr=False)  # steps 2-6 for any strip of rows of `pixels`
    full_shape: tuple[int, int] = (0, 0)  # (rows, cols) of the image; `pixels` may be reduced
    pipeline_version: str = PIPELINE_VERSION

    @cached_property
    def image(self) -> np.ndarray:
        """2-D float32 in [0, 1], lungs dark / bone bright, full resolution."""
        return apply_in_strips(self.pixels, self.transform)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    def _source(self) -> tuple[np.ndarray, Transform]:
        if "image" in self.__dict__:  # already materialised: reuse it
            return self.image, _as_float
        return self.pixels, self.transform


def _as_float(strip: np.ndarray) -> np.ndarray:
    return np.asarray(strip, dtype=np.float32)


def load_image(
    source: Source | PixelResult, limits: PixelsConfig | None = None, at_least: int | None = None
) -> PixelResult:
    """Decode the first frame and prepare its rendering to float32 [0, 1].

    ``at_least``: only this many pixels along the longer side are needed (a model input,
    not the viewer), so JPEG 2000 and JPEG DICOM frames may be decoded at reduced resolution.
    """
    if isinstance(source, PixelResult):
        return source
    return render(decode(source, limits, at_least))


def model_decode_size(size: int) -> int:
    """The longer side the model path decodes to, at least (see dicom_io.reduced)."""
    return REDUCED_DECODE_MARGIN * size


def to_model_tensor(
    source: Source | PixelResult, size: int = DEFAULT_INPUT_SIZE, limits: PixelsConfig | None = None
) -> np.ndarray:
    """(size, size, 1) float32 in [0, 1]: the exact input of every model, letterboxed.

    The letterbox geometry comes from the image's full size, so a reduced decode lands on
    the same canvas rectangle as the full one."""
    image = load_image(source, limits, at_least=model_decode_size(size))
    pixels, transform = image._source()
    return letterbox_transformed(pixels, transform, size, shape=image.full_shape)[..., np.newaxis]


def render_display(
    source: Source | PixelResult, max_size: int = DEFAULT_DISPLAY_SIZE, limits: PixelsConfig | None = None
) -> np.ndarray:
    """uint8 2-D image for the worklist viewer: same rendering, longer side <= max_size,
    aspect kept, no padding, never upscaled."""
    pixels, transform = load_image(source, limits)._source()
    image = fit_within_transformed(pixels, transform, max_size)
    out = np.multiply(image, 255.0, dtype=np.float32)
    out += 0.5
    return out.astype(np.uint8)


def mask_bits(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Keep only the Bits Stored low bits: unused high bits may hold overlays or garbage.

    Unsigned: AND with the mask.  Signed: shift left then arithmetic shift right, which
    also sign-extends (e.g. 12-bit two's complement in a 16-bit container).  Returns a new
    array when bits are dropped; the decoded frame may be a read-only view of the file.
    """
    container = arr.dtype.itemsize * 8
    if not np.issubdtype(arr.dtype, np.integer) or bits_stored >= container:
        return arr
    if signed:
        shift = container - bits_stored
        return np.right_shift(np.left_shift(arr, shift), shift)
    return np.bitwise_and(arr, arr.dtype.type((1 << bits_stored) - 1))


def is_grey_rgb(rgb: np.ndarray) -> bool:
    """Grey stored as RGB (R == G == B everywhere): then one channel is used unchanged."""
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, float32."""
    out = np.multiply(rgb[..., 0], np.float32(LUMA_WEIGHTS[0]), dtype=np.float32)
    out += np.multiply(rgb[..., 1], np.float32(LUMA_WEIGHTS[1]), dtype=np.float32)
    out += np.multiply(rgb[..., 2], np.float32(LUMA_WEIGHTS[2]), dtype=np.float32)
    return out


def _percentile_step(window: Window) -> str:
    return (
        f"VOI: none in the file: percentile {PERCENTILE_LOW:g}-{PERCENTILE_HIGH:g} window, "
        f"centre {window.center:g} width {window.width:g}"
    )


def _decode_step(dec: Decoded) -> str:
    if dec.kind != "dicom":
        return f"decode: {dec.kind.upper()} ({dec.array.dtype}, {dec.photometric})"
    ts = UID(dec.transfer_syntax or "")
    if dec.reduction > 1:
        rows, cols = dec.full_shape
        return (
            f"decode: DICOM {ts.name} ({ts}) at reduced resolution: {dec.reduction_method},"
            f" {dec.array.shape[0]}x{dec.array.shape[1]} of {rows}x{cols}"
        )
    return f"decode: DICOM {ts.name} ({ts})"


def render(dec: Decoded) -> PixelResult:
    """Decide steps 2-6 for a decoded frame (see the module docstring for the order) and
    return them as one elementwise transform; nothing full-size is computed here."""
    steps = [_decode_step(dec)]
    if dec.frames > 1:
        steps.append(f"multi-frame: frame {dec.frame_used + 1} of {dec.frames} used")
    if dec.array.ndim == 3:
        transform, window = _colour_transform(dec, steps)
    else:
        transform, window = _grey_transform(dec, steps)
    steps.append("output: float32 [0, 1], 0 black (air), 1 white (bone)")
    return PixelResult(
        kind=dec.kind,
        photometric=dec.photometric,
        frames=dec.frames,
        frame_used=dec.frame_used,
        window=window,
        steps=tuple(steps),
        transfer_syntax=dec.transfer_syntax,
        pixels=dec.array,
        transform=transform,
        full_shape=dec.full_shape,
    )


def _colour_transform(dec: Decoded, steps: list[str]) -> tuple[Transform, Window]:
    """Colour images carry no Modality/VOI LUT: luma, then the same percentile window as
    every other VOI-less image (a grey film saved as RGB must score like the grey file).
    Both steps are linear, so luma is computed first, on the integers."""
    bits = min(dec.bits_stored, 16) if dec.kind == "dicom" else 8
    grey = is_grey_rgb(dec.array)
    steps.append("colour: grey stored as RGB, one channel used" if grey else "colour: RGB to luminance (BT.601)")
    # sampled per plane, so a grey film stored as RGB is sampled at the grey file's grid
    sample = np.stack([subsample(dec.array[..., c]) for c in range(dec.array.shape[-1])], axis=-1)
    sample = mask_bits(np.array(sample), bits, False) if dec.kind == "dicom" else sample
    window = percentile_window(sample[..., 0] if grey else luminance(sample))
    a, b = window_affine(window)
    steps.append(_percentile_step(window))

    def transform(strip: np.ndarray) -> np.ndarray:
        strip = mask_bits(strip, bits, False) if dec.kind == "dicom" else strip
        return affine_clip(strip[..., 0] if grey else luminance(strip), a, b)

    return transform, window


def _grey_transform(dec: Decoded, steps: list[str]) -> tuple[Transform, Window]:
    ds = dec.header
    arr = dec.array
    bits, signed = dec.bits_stored, dec.signed
    container = arr.dtype.itemsize * 8
    do_mask, little = _stored_layout(dec)
    if do_mask:
        steps.append(f"bits stored: low {bits} of {container} bits kept")

    # Step 3: Modality LUT.
    mlut, slope, intercept = _modality_lut(ds, little, steps)

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
    if window is None:
        sample = subsample(arr)
        sample = mask_bits(np.array(sample), bits, signed) if do_mask else sample
        window = _auto_window(sample, ds, mlut, slope, intercept)
        steps.append(_percentile_step(window) + (" (Pixel Padding excluded)" if ds is not None else ""))

    # Step 5: MONOCHROME1 inversion after VOI (composed into the affine when possible).
    invert = dec.photometric == "MONOCHROME1"
    if invert:
        steps.append("MONOCHROME1: inverted after VOI")
    final = window

    if voi_lut is None and mlut is None and final.function != "SIGMOID":
        a, b = window_affine(final)
        a, b = a * slope, a * intercept + b
        if invert:
            a, b = -a, 1.0 - b

        def affine(strip: np.ndarray) -> np.ndarray:
            return affine_clip(mask_bits(strip, bits, signed) if do_mask else strip, a, b)

        return affine, final

    def general(strip: np.ndarray) -> np.ndarray:
        stored = mask_bits(strip, bits, signed) if do_mask else strip
        values = mlut.apply(stored) if mlut is not None else _rescale(stored, slope, intercept)
        if voi_lut is not None:
            out = voi_lut.apply(np.rint(values)).astype(np.float32)
            out *= np.float32(1.0 / float((1 << voi_lut.bits) - 1))
            np.clip(out, 0.0, 1.0, out=out)
        elif final.function == "SIGMOID":
            out = sigmoid(values, final)
        else:
            wa, wb = window_affine(final)
            out = affine_clip(values, wa, wb)
        if invert:
            np.subtract(np.float32(1.0), out, out=out)
        return out

    return general, final


def _stored_layout(dec: Decoded) -> tuple[bool, bool]:
    """(step 2 applies: a DICOM integer frame with unused high bits, LUT data is little-endian)."""
    ds, arr = dec.header, dec.array
    do_mask = ds is not None and dec.bits_stored < arr.dtype.itemsize * 8 and np.issubdtype(arr.dtype, np.integer)
    return bool(do_mask), transfer_syntax(ds).is_little_endian if ds is not None else True


def _modality_lut(ds: Dataset | None, little: bool, steps: list[str]) -> tuple[Lut | None, float, float]:
    """Step 3's choice: (Modality LUT Sequence, else None; Rescale Slope; Intercept)."""
    if ds is not None and ds.get("ModalityLUTSequence"):
        steps.append("modality LUT: Modality LUT Sequence")
        return read_lut(ds.ModalityLUTSequence[0], little), 1.0, 0.0
    if ds is not None and ("RescaleSlope" in ds or "RescaleIntercept" in ds):
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        steps.append(f"modality LUT: Rescale Slope {slope:g}, Intercept {intercept:g}")
        return None, slope, intercept
    return None, 1.0, 0.0


def value_transform(dec: Decoded) -> Transform:
    """Steps 2-3 for grey (bits stored, Modality LUT) or 2 and 6 for colour (luma), no VOI:
    the float32 values a viewer windows itself, in the units ``render(dec).window`` is in,
    so its default window is exactly the one the model's rendering used."""
    if dec.array.ndim == 3:
        bits = min(dec.bits_stored, 16) if dec.kind == "dicom" else 8
        grey = is_grey_rgb(dec.array)

        def colour(strip: np.ndarray) -> np.ndarray:
            strip = mask_bits(strip, bits, False) if dec.kind == "dicom" else strip
            return np.asarray(strip[..., 0] if grey else luminance(strip), dtype=np.float32)

        return colour
    bits, signed = dec.bits_stored, dec.signed
    do_mask, little = _stored_layout(dec)
    mlut, slope, intercept = _modality_lut(dec.header, little, [])

    def grey_values(strip: np.ndarray) -> np.ndarray:
        stored = mask_bits(strip, bits, signed) if do_mask else strip
        values = mlut.apply(stored) if mlut is not None else _rescale(stored, slope, intercept)
        return np.asarray(values, dtype=np.float32)

    return grey_values


def _rescale(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if slope == 1.0 and intercept == 0.0:
        return arr
    out = np.multiply(arr, np.float32(slope), dtype=np.float32)
    out += np.float32(intercept)
    return out


def _auto_window(sample: np.ndarray, ds: Dataset | None, mlut: Lut | None, slope: float, intercept: float) -> Window:
    """Percentile window on a sampled grid, stored padding values excluded, in
    modality-output units (so it composes with Rescale Slope/Intercept like a header one):
    (0028,0120) Pixel Padding Value and (0028,0121) Pixel Padding Range Limit."""
    if ds is not None:
        mask = padding_mask(sample, ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit"))
        if mask is not None and not mask.all():
            sample = sample[~mask]
    values = mlut.apply(sample) if mlut is not None else _rescale(sample, slope, intercept)
    return percentile_window(np.asarray(values))
