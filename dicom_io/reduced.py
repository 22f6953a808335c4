"""Decode only the resolution the model needs, where the codestream allows it.

A 224 px model reads a 1955x1841 JPEG 2000 radiograph; decoding it in full costs about a
second on this machine, and most of that work is thrown away by the resize.  Both
compressions used for radiographs can stop early:

* JPEG 2000 is a wavelet pyramid: OpenJPEG (through Pillow) decodes resolution level r, an
  image 2**r times smaller per side, for a fraction of the work.
* JPEG (baseline, 8 bit) can scale in the DCT domain: libjpeg's scaled IDCT (Pillow's
  ``draft``) returns 1/2, 1/4 or 1/8 of the size.

The largest reduction is chosen that keeps the decoded image's longer side at least
``at_least`` pixels (the pixel path asks for twice the model's input).  Anything this module
does not handle for certain returns None and the caller decodes in full: colour or signed
data, more than 16 bits, JPEG 12 bit, a codestream whose header disagrees, a decoder error.
The stored values keep their units (Pillow's scaling of JPEG 2000 samples to 8/16 bits is
undone), so masking, LUTs and windows apply unchanged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit

from dicom_io.codestream import j2k_coding

J2K_SYNTAXES = frozenset({str(JPEG2000Lossless), str(JPEG2000)})
JPEG_SYNTAXES = frozenset({str(JPEGBaseline8Bit), str(JPEGExtended12Bit)})
REDUCIBLE = J2K_SYNTAXES | JPEG_SYNTAXES
JPEG_SCALES = (8, 4, 2)  # libjpeg's scaled IDCT: 1/8, 1/4, 1/2


@dataclass(frozen=True)
class Reduced:
    array: np.ndarray  # (ceil(rows / factor), ceil(cols / factor)) stored values
    factor: int  # 2, 4, 8 ...: the image is 1/factor of the full size per side
    method: str  # in words, for the pixel path's steps


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def largest_factor(rows: int, cols: int, at_least: int) -> int:
    """The largest power of two f with ceil(max(rows, cols) / f) >= at_least (1: no reduction)."""
    longer, factor = max(rows, cols), 1
    while _ceil_div(longer, factor * 2) >= at_least:
        factor *= 2
    return factor


def reduced_frame(
    pixel_data: bytes, transfer_syntax: str, rows: int, cols: int, frames: int, samples: int, at_least: int
) -> Reduced | None:
    """The first frame at reduced resolution, or None: then decode in full."""
    if transfer_syntax not in REDUCIBLE or samples != 1:
        return None
    wanted = largest_factor(rows, cols, at_least)
    if wanted == 1:
        return None
    try:
        frame = next(generate_frames(pixel_data, number_of_frames=frames))
    except Exception:  # noqa: BLE001 - the full decoder reports a broken item sequence properly
        return None
    if transfer_syntax in J2K_SYNTAXES:
        return _j2k(frame, rows, cols, wanted)
    return _jpeg(frame, rows, cols, wanted)


def _pillow_level_ok(size: int, level: int) -> bool:
    """Pillow sizes a reduced JPEG 2000 image as round-half-up(size / 2**level), OpenJPEG
    decodes ceil(size / 2**level); where the two differ the decode fails, so such a level
    is not used (level 1 always agrees)."""
    power = 1 << level
    return (size + (power >> 1)) // power == _ceil_div(size, power)


def _j2k(frame: bytes, rows: int, cols: int, wanted: int) -> Reduced | None:
    coding = j2k_coding(frame[: 1 << 16])
    if coding is None or coding.components != 1 or coding.signed or coding.precision > 16:
        return None
    level = min(wanted.bit_length() - 1, coding.levels)
    while level > 0 and not (_pillow_level_ok(rows, level) and _pillow_level_ok(cols, level)):
        level -= 1
    if level == 0:
        return None
    try:
        with Image.open(io.BytesIO(frame)) as im:
            if im.size != (cols, rows):
                return None
            im.reduce = level  # type: ignore[method-assign,assignment]  # Jpeg2KImageFile's resolution level
            im.load()
            mode, raw = im.mode, np.asarray(im)
    except Exception:  # noqa: BLE001 - any decoder complaint: the full decode decides
        return None
    factor = 1 << level
    if raw.shape != (_ceil_div(rows, factor), _ceil_div(cols, factor)):
        return None
    # Pillow scales samples up to the mode's depth; shift back to the stored values.
    if mode == "L" and coding.precision <= 8:
        array = np.right_shift(raw, 8 - coding.precision) if coding.precision < 8 else raw
    elif mode == "I;16" and coding.precision > 8:
        array = np.right_shift(raw, 16 - coding.precision) if coding.precision < 16 else raw
    else:
        return None
    return Reduced(
        np.ascontiguousarray(array),
        factor,
        f"JPEG 2000 resolution level {level} of {coding.levels} (1/{factor} per side)",
    )


def _jpeg(frame: bytes, rows: int, cols: int, wanted: int) -> Reduced | None:
    scale = next((s for s in JPEG_SCALES if s <= wanted), 1)
    if scale == 1:
        return None
    try:
        with Image.open(io.BytesIO(frame)) as im:
            if im.format != "JPEG" or im.mode != "L" or im.size != (cols, rows):
                return None  # colour, 12 bit or a header that disagrees: full decode
            im.draft("L", (_ceil_div(cols, scale), _ceil_div(rows, scale)))
            im.load()
            raw = np.asarray(im)
    except Exception:  # noqa: BLE001 - any decoder complaint: the full decode decides
        return None
    factor = next((s for s in (8, 4, 2) if raw.shape == (_ceil_div(rows, s), _ceil_div(cols, s))), None)
    if factor is None or raw.dtype != np.uint8:
        return None
    return Reduced(np.ascontiguousarray(raw), factor, f"JPEG scaled IDCT (1/{factor} per side)")
