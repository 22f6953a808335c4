"""Step 1 of the pixel path: any source -> the first frame's stored values, plus header.

Sources are a path, bytes, a binary file object or a pydicom Dataset; DICOM with or
without preamble and file meta, PNG and JPEG.  All size checks run on the DECLARED
attributes before a pixel buffer is allocated, so a file claiming 65535x65535 costs
nothing but an ``ImageTooLarge``.  Decoder failures are re-raised as typed
``dicom_io.errors`` exceptions.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_io.codestream import codestream_size
from dicom_io.errors import (
    CorruptPixelData,
    ImageTooLarge,
    InvalidPixelAttributes,
    MissingPixelData,
    NotAnImage,
    PixelError,
    TruncatedPixelData,
    UnsupportedPhotometric,
    UnsupportedTransferSyntax,
)
from dicom_io.inflate import InflateError, dcmread_bounded
from dicom_io.reduced import reduced_frame
from settings import PixelsConfig

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | Dataset

DEFAULT_MAX_PIXEL_BYTES = PixelsConfig().max_pixel_bytes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"

MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
# What the decoders hand back as RGB when asked (as_rgb=True converts YBR_FULL/_422;
# JPEG 2000 and JPEG-LS decoders undo ICT/RCT themselves).
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})


@dataclass(frozen=True)
class Decoded:
    """The first frame as stored (no LUTs applied yet) and what is needed to render it."""

    kind: str  # "dicom", "png" or "jpeg"
    array: np.ndarray  # (rows, cols) grey or (rows, cols, 3) RGB; integer unless a float image
    photometric: str
    frames: int
    frame_used: int
    bits_stored: int
    signed: bool
    header: Dataset | None
    transfer_syntax: str | None
    # 1, or 2, 4, 8 ...: `array` is that many times smaller per side than the image (dicom_io.reduced).
    reduction: int = 1
    reduction_method: str | None = None

    @property
    def full_shape(self) -> tuple[int, int]:
        """(rows, columns) of the image itself, whatever resolution was decoded."""
        if self.header is not None and self.reduction > 1:
            return int(self.header.Rows), int(self.header.Columns)
        return int(self.array.shape[0]), int(self.array.shape[1])


def _as_bytes(source: Source) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise NotAnImage("file object must be opened in binary mode")
        return data
    path = Path(os.fspath(source))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NotAnImage(f"cannot read {path}: {exc.strerror or exc}") from None


def decode(source: Source, limits: PixelsConfig | None = None, at_least: int | None = None) -> Decoded:
    """Sniff the format by its signature and decode the first frame.

    ``at_least``: the caller needs no more than this many pixels along the longer side, so a
    JPEG 2000 or JPEG DICOM frame may be decoded at a reduced resolution (dicom_io.reduced).
    PNG and JPEG files are always decoded in full.
    """
    limits = limits or PixelsConfig()
    if isinstance(source, Dataset):
        return decode_dataset(source, limits, at_least)
    if isinstance(source, str | os.PathLike):
        path = Path(os.fspath(source))
        try:
            with path.open("rb") as fh:
                head = fh.read(132)
        except OSError as exc:
            raise NotAnImage(f"cannot read {path}: {exc.strerror or exc}") from None
        if not head.startswith((PNG_SIGNATURE, JPEG_SIGNATURE)):
            # pydicom reads the file itself: one copy of Pixel Data instead of two.
            return decode_dataset(read_dataset(path, limits.max_pixel_bytes), limits, at_least)
    data = _as_bytes(source)
    if data.startswith(PNG_SIGNATURE):
        return _decode_pillow(data, "png", limits)
    if data.startswith(JPEG_SIGNATURE):
        return _decode_pillow(data, "jpeg", limits)
    return decode_dataset(read_dataset(data, limits.max_pixel_bytes), limits, at_least)


def read_dataset(data: bytes | Path, max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES) -> Dataset:
    """Parse DICOM with or without the 128-byte preamble and file meta (force=True).

    A deflated dataset is inflated under a budget from its declared pixel size (dicom_io.inflate),
    never in one go: a small upload must not become gigabytes in memory.
    """
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    if size < 8:
        raise NotAnImage(f"{size} bytes: too short to be DICOM, PNG or JPEG")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = dcmread_bounded(data, force=True, max_pixel_bytes=max_pixel_bytes)
    except InflateError as exc:
        raise CorruptPixelData(f"deflated dataset: {exc}") from None
    except (InvalidDicomError, EOFError) as exc:
        raise NotAnImage(f"not DICOM, PNG or JPEG: {exc}") from None
    except Exception as exc:  # pydicom raises many types on garbage; all mean the same here
        raise NotAnImage(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc
    # pydicom reads a file cut inside encapsulated Pixel Data and only warns.
    ended = [str(w.message) for w in caught if "End of file reached" in str(w.message)]
    if ended:
        raise TruncatedPixelData(f"file ends inside an element: {ended[0]}")
    # force=True accepts anything; real DICOM has group 0008/0028 elements.
    if not any(int(tag) >> 16 in (0x0008, 0x0010, 0x0020, 0x0028, 0x7FE0) for tag in ds.keys()):
        raise NotAnImage("not DICOM, PNG or JPEG: no recognisable DICOM elements")
    return ds


def transfer_syntax(ds: Dataset) -> UID:
    """(0002,0010) Transfer Syntax UID, else inferred from how the dataset was read.

    Files without file meta (the NEMA sample) can only be native: implicit VR little
    endian, explicit little or explicit big endian.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    if implicit or implicit is None:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise InvalidPixelAttributes(f"{keyword} is missing")
        value = default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidPixelAttributes(f"{keyword} {value!r} is not an integer") from None


def _check_limits(rows: int, cols: int, samples: int, bytes_per_sample: int, limits: PixelsConfig) -> None:
    if rows > limits.max_rows or cols > limits.max_columns:
        raise ImageTooLarge(
            f"declared {rows}x{cols} exceeds the limit {limits.max_rows}x{limits.max_columns} (pixels.max_rows/columns)"
        )
    frame_bytes = rows * cols * samples * bytes_per_sample
    if frame_bytes > limits.max_pixel_bytes:
        raise ImageTooLarge(
            f"declared frame of {frame_bytes} bytes exceeds pixels.max_pixel_bytes={limits.max_pixel_bytes}"
        )


def decode_dataset(ds: Dataset, limits: PixelsConfig | None = None, at_least: int | None = None) -> Decoded:
    """Validate the Image Pixel module against limits and the data, then decode frame 0.

    Reads (0028,0002) Samples per Pixel, (0028,0004) Photometric Interpretation,
    (0028,0008) Number of Frames, (0028,0010) Rows, (0028,0011) Columns,
    (0028,0100) Bits Allocated, (0028,0101) Bits Stored, (0028,0103) Pixel Representation.
    """
    limits = limits or PixelsConfig()
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InvalidPixelAttributes("Float Pixel Data is not a radiograph encoding")
        raise MissingPixelData("no (7FE0,0010) Pixel Data element: not an image object")
    rows = _int_attr(ds, "Rows")
    cols = _int_attr(ds, "Columns")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    bits_alloc = _int_attr(ds, "BitsAllocated")
    bits_stored = _int_attr(ds, "BitsStored", bits_alloc)
    signed = _int_attr(ds, "PixelRepresentation", 0) == 1
    frames = max(1, _int_attr(ds, "NumberOfFrames", 1)) if ds.get("NumberOfFrames") not in (None, "") else 1
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if rows < 1 or cols < 1:
        raise InvalidPixelAttributes(f"Rows/Columns {rows}x{cols} describe no image")
    if bits_alloc not in (8, 16, 32):
        raise InvalidPixelAttributes(f"Bits Allocated {bits_alloc} is not 8, 16 or 32")
    if not 1 <= bits_stored <= bits_alloc:
        raise InvalidPixelAttributes(f"Bits Stored {bits_stored} does not fit Bits Allocated {bits_alloc}")
    if samples not in (1, 3):
        raise InvalidPixelAttributes(f"Samples per Pixel {samples} is not 1 or 3")
    if samples == 1 and photometric not in MONOCHROME:
        raise UnsupportedPhotometric(f"photometric interpretation {photometric or '(empty)'} is not rendered")
    if samples == 3 and photometric not in COLOUR:
        raise UnsupportedPhotometric(f"photometric interpretation {photometric or '(empty)'} is not rendered")
    if frames > limits.max_frames:
        raise ImageTooLarge(f"declared {frames} frames exceeds pixels.max_frames={limits.max_frames}")
    _check_limits(rows, cols, samples, bits_alloc // 8, limits)

    ts = transfer_syntax(ds)
    pixel_data = ds.PixelData
    if pixel_data is None or len(pixel_data) == 0:
        raise TruncatedPixelData("Pixel Data element is empty")
    decoded = partial(Decoded, "dicom", frames=frames, frame_used=0, bits_stored=bits_stored, signed=signed,
                      header=ds, transfer_syntax=str(ts))  # fmt: skip
    if ts.is_encapsulated:
        _check_codestream(pixel_data, rows, cols, limits)
        if at_least is not None:
            reduced = reduced_frame(pixel_data, str(ts), rows, cols, frames, samples, at_least)
            if reduced is not None:
                return decoded(array=reduced.array, photometric=photometric, reduction=reduced.factor,
                               reduction_method=reduced.method)  # fmt: skip
    else:
        expected = rows * cols * samples * (bits_alloc // 8) * frames
        if len(pixel_data) < expected:
            raise TruncatedPixelData(
                f"Pixel Data holds {len(pixel_data)} bytes but Rows {rows} x Columns {cols} x Samples {samples}"
                f" x Bits Allocated {bits_alloc} x Frames {frames} need {expected}"
            )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnsupportedTransferSyntax(f"no decoder for transfer syntax {ts} ({ts.name})") from None
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(
            f"transfer syntax {ts.name}: decoder plugins missing ({'; '.join(decoder.missing_dependencies)})"
        )
    try:
        # view_only: native data is not copied; the transform never writes in place.
        options: dict[str, Any] = {"as_rgb": True, "correct_unused_bits": False, "view_only": True}
        arr, meta = decoder.as_array(ds, index=0, **options)
    except PixelError:
        raise
    except Exception as exc:  # every decoder plugin has its own error types
        raise CorruptPixelData(f"{ts.name} decoder failed: {type(exc).__name__}: {exc}") from exc
    if arr.shape[:2] != (rows, cols):
        raise CorruptPixelData(f"decoded frame is {arr.shape[:2]}, header says {rows}x{cols}")
    out_photometric = str(meta.get("photometric_interpretation", photometric))
    if samples == 3:
        out_photometric = "RGB" if out_photometric.startswith(("YBR", "RGB")) else out_photometric
    return decoded(array=arr, photometric=out_photometric if samples == 3 else photometric)


def _check_codestream(pixel_data: bytes, rows: int, cols: int, limits: PixelsConfig) -> None:
    """Encapsulated data: the codestream's own size must agree with Rows/Columns, because
    the plugins allocate what the codestream declares, not what the header says."""
    if not pixel_data.startswith(b"\xfe\xff\x00\xe0"):
        raise CorruptPixelData("encapsulated transfer syntax but Pixel Data is not an item sequence")
    size = codestream_size(pixel_data)
    if size is None:
        return
    c_rows, c_cols = size
    if c_rows > limits.max_rows or c_cols > limits.max_columns:
        raise ImageTooLarge(f"codestream declares {c_rows}x{c_cols}, above the configured limits")
    if (c_rows, c_cols) != (rows, cols):
        raise CorruptPixelData(f"codestream is {c_rows}x{c_cols} but Rows/Columns say {rows}x{cols}")


def _decode_pillow(data: bytes, kind: str, limits: PixelsConfig) -> Decoded:
    """PNG/JPEG: 8 or 16 bit grey, grey stored as RGB, or colour (made luminance later)."""
    try:
        im: Image.Image = Image.open(io.BytesIO(data))
        width, height = im.size
        bands = len(im.getbands())
        depth = 2 if im.mode.startswith("I") else 1
        _check_limits(height, width, bands, depth, limits)
        im.load()
        if kind == "jpeg":
            im = ImageOps.exif_transpose(im) or im
    except PixelError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except UnidentifiedImageError as exc:
        raise NotAnImage(f"{kind.upper()} signature but unreadable: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if "truncated" in str(exc).lower():
            raise TruncatedPixelData(f"{kind.upper()} data is truncated: {exc}") from None
        raise CorruptPixelData(f"{kind.upper()} decoder failed: {exc}") from None
    arr, photometric, bits = _pillow_array(im)
    return Decoded(
        kind=kind,
        array=arr,
        photometric=photometric,
        frames=getattr(im, "n_frames", 1),
        frame_used=0,
        bits_stored=bits,
        signed=False,
        header=None,
        transfer_syntax=None,
    )


def _pillow_array(im: Image.Image) -> tuple[np.ndarray, str, int]:
    mode = im.mode
    if mode in ("L", "LA"):
        arr: np.ndarray = np.asarray(im if mode == "L" else im.getchannel("L"))
        return arr, "MONOCHROME2", 8
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False), "MONOCHROME2", 16
    if mode == "I":
        raw = np.asarray(im)
        if raw.min(initial=0) < 0 or raw.max(initial=0) > 65535:
            raise InvalidPixelAttributes("32-bit integer image outside 0..65535")
        return raw.astype(np.uint16), "MONOCHROME2", 16
    if mode == "F":
        return np.asarray(im, dtype=np.float32), "MONOCHROME2", 32
    if mode in ("RGB", "RGBA", "RGBX"):
        return np.asarray(im)[..., :3], "RGB", 8
    if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        converted = im.convert("RGB")
        return np.asarray(converted), "RGB", 8
    raise UnsupportedPhotometric(f"image mode {mode} is not rendered")


def describe_source(source: Any) -> str:
    """Short name for log lines and error messages."""
    if isinstance(source, Dataset):
        return f"dataset {source.get('SOPInstanceUID', '?')}"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"{len(source)} bytes"
    return str(source)
