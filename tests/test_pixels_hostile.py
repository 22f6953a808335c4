"""Hostile and odd input: every failure is a typed PixelError, raised before any large
allocation, and the caller keeps running."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pydicom
import pytest

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
)
from dicom_io.pixels import load_image, to_model_tensor
from settings import PixelsConfig, load_settings
from tests.plugins.pixels import dataset_bytes

# Peak Python/numpy allocation allowed while refusing a hostile file: the file itself
# plus parsing, far below one decoded 65535x65535 frame (8 GiB).
REFUSAL_PEAK_BYTES = 64 * 1024 * 1024


def _nema(nema_path) -> pydicom.Dataset:
    ds = pydicom.dcmread(nema_path, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def test_truncated_native_pixel_data(rg1) -> None:
    ds = pydicom.dcmread(rg1["UNCR"])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(TruncatedPixelData, match="need"):
        load_image(ds)


def test_truncated_file(rg1) -> None:
    data = rg1["UNCR"].read_bytes()
    with pytest.raises(TruncatedPixelData):
        load_image(data[: len(data) - 100_000])


def test_truncated_jpeg2000_file(rg1) -> None:
    data = rg1["J2KR"].read_bytes()
    with pytest.raises(TruncatedPixelData):
        load_image(data[: len(data) // 3])


def test_truncated_jpeg_file(kermany_jpeg) -> None:
    data = kermany_jpeg.read_bytes()
    with pytest.raises(TruncatedPixelData):
        load_image(data[: len(data) // 2])


def test_rows_columns_larger_than_the_data(nema_path) -> None:
    ds = _nema(nema_path)
    ds.Rows = 512
    with pytest.raises(TruncatedPixelData):
        load_image(ds)


def test_bits_allocated_larger_than_the_data(nema_path) -> None:
    ds = _nema(nema_path)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 16, 15
    with pytest.raises(TruncatedPixelData):
        load_image(ds)


@pytest.mark.parametrize(
    ("keyword", "value", "error"),
    [
        ("BitsStored", 17, InvalidPixelAttributes),
        ("BitsAllocated", 12, InvalidPixelAttributes),
        ("SamplesPerPixel", 2, InvalidPixelAttributes),
        ("Rows", 0, InvalidPixelAttributes),
        ("PhotometricInterpretation", "PALETTE COLOR", UnsupportedPhotometric),
        ("PhotometricInterpretation", "", UnsupportedPhotometric),
    ],
)
def test_impossible_attributes(nema_path, keyword, value, error) -> None:
    ds = _nema(nema_path)
    setattr(ds, keyword, value)
    with pytest.raises(error):
        load_image(ds)


def test_unsupported_colour_photometric(nih_png) -> None:
    from PIL import Image

    from tests.plugins.pixels import dicom_from_pixels

    rgb = np.asarray(Image.open(nih_png).convert("RGB"))
    with pytest.raises(UnsupportedPhotometric, match="HSV"):
        load_image(dicom_from_pixels(rgb, photometric="HSV"))


def test_declared_65535_square_is_refused_without_allocating(nema_path) -> None:
    ds = _nema(nema_path)
    ds.Rows, ds.Columns = 65535, 65535
    data = dataset_bytes(ds)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge, match="65535x65535"):
            to_model_tensor(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < REFUSAL_PEAK_BYTES


def test_byte_limit_applies_below_the_row_limit(nema_path) -> None:
    ds = _nema(nema_path)
    ds.Rows, ds.Columns = 8000, 8000  # within 8192, but 128 MB of 16-bit pixels > limit
    with pytest.raises(ImageTooLarge, match="max_pixel_bytes"):
        load_image(ds, limits=PixelsConfig(max_pixel_bytes=64 * 1024 * 1024))


def test_limits_are_configurable(nema_path) -> None:
    settings = load_settings(environ={"XRAY_TRIAGE_PIXELS__MAX_ROWS": "400"})
    with pytest.raises(ImageTooLarge):
        load_image(nema_path, limits=settings.pixels)
    assert load_image(nema_path, limits=PixelsConfig()).image.shape == (440, 440)


def test_png_declaring_a_huge_size_is_refused_before_decoding(nih_png) -> None:
    data = bytearray(nih_png.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 60000, 60000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # keep the chunk CRC valid
    with pytest.raises(ImageTooLarge):
        load_image(bytes(data))


def _patch_sof(pixel_data: bytes, rows: int, cols: int) -> bytes:
    at = pixel_data.find(b"\xff\xc0")
    assert at > 0
    return pixel_data[: at + 5] + struct.pack(">HH", rows, cols) + pixel_data[at + 9 :]


def test_jpeg_codestream_larger_than_header_is_refused(siim_path) -> None:
    """Header says 1024x1024, the JPEG frame header says 60000x60000: the plugin would
    allocate the latter, so it must be refused before decoding."""
    ds = pydicom.dcmread(siim_path)
    ds.PixelData = _patch_sof(ds.PixelData, 60000, 60000)
    assert codestream_size(ds.PixelData) == (60000, 60000)
    with pytest.raises(ImageTooLarge, match="codestream"):
        load_image(ds)


def test_jpeg_codestream_disagreeing_with_rows(siim_path) -> None:
    ds = pydicom.dcmread(siim_path)
    ds.Rows = 1000
    with pytest.raises(CorruptPixelData, match="1024x1024"):
        load_image(ds)


def test_j2k_codestream_size_is_read(rg1) -> None:
    ds = pydicom.dcmread(rg1["J2KR"])
    assert codestream_size(ds.PixelData) == (1955, 1841)


def test_corrupt_jpeg_codestream(siim_path) -> None:
    ds = pydicom.dcmread(siim_path)
    data = bytearray(ds.PixelData)
    at = data.find(b"\xff\xda")  # start of scan: scramble the entropy-coded data
    data[at + 20 : at + 4000] = bytes(3980)
    data[at + 4 : at + 6] = b"\x09\x09"  # invalid component count in the SOS header
    ds.PixelData = bytes(data)
    with pytest.raises(CorruptPixelData):
        load_image(ds)


def test_missing_pixel_data(nema_path) -> None:
    ds = _nema(nema_path)
    del ds.PixelData
    with pytest.raises(MissingPixelData):
        load_image(ds)
    with pytest.raises(NotAnImage):  # MissingPixelData is a NotAnImage
        load_image(dataset_bytes(ds))


def test_header_only_dataset_read_without_pixels(siim_path) -> None:
    with pytest.raises(MissingPixelData):
        load_image(pydicom.dcmread(siim_path, stop_before_pixels=True))


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"\xff\xd8\xff" + b"\x00" * 64, bytes(range(256)) * 8],
    ids=["empty", "text", "png-signature-only", "jpeg-signature-only", "binary"],
)
def test_not_an_image(data) -> None:
    with pytest.raises(PixelError):
        load_image(data)


def test_missing_file_is_a_typed_error(tmp_path) -> None:
    with pytest.raises(NotAnImage, match="cannot read"):
        load_image(tmp_path / "absent.dcm")


def test_errors_are_value_errors_so_callers_survive(rg1) -> None:
    """One except clause in the worker catches them all, and the next file still works."""
    failures = []
    for source in (b"junk", rg1["UNCR"].read_bytes()[:5000], rg1["UNCR"]):
        try:
            load_image(source)
        except ValueError as exc:
            assert isinstance(exc, PixelError)
            failures.append(type(exc).__name__)
    assert len(failures) == 2


def test_text_file_stream(tmp_path) -> None:
    with pytest.raises(NotAnImage):
        load_image(io.StringIO("not binary"))  # type: ignore[arg-type]
