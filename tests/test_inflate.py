"""Deflated data read under a budget, on the pixel path too (uploads, predict, the worker).

A deflate bomb must fail with a clear error after inflating no more than its declared size,
and a real deflated radiograph must read exactly as pydicom reads it.
"""

from __future__ import annotations

import io
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from dicom_io.decode import decode
from dicom_io.errors import CorruptPixelData
from dicom_io.inflate import InflateError, dcmread_bounded, inflate
from tests.conftest import pydicom_data_file
from tests.test_listener_hostile_pdus import MIB, _peak_rss, _peak_rss_reset

DEFLATED = "1.2.840.10008.1.2.1.99"


def _part10_deflated(ds: pydicom.Dataset, deflated_body: bytes) -> bytes:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DEFLATED
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta)
    return fp.getvalue() + deflated_body


def _bomb_body(ds: pydicom.Dataset, pixel_length: int) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(fp.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + pixel_length.to_bytes(4, "little"))]
    zeros = bytes(8 * MIB)
    out += [z.compress(zeros) for _ in range(pixel_length // len(zeros))]
    return b"".join(out) + z.flush()


def test_a_real_deflated_radiograph_reads_as_pydicom_reads_it(tmp_path: Path):
    src = pydicom_data_file("RG1_UNCR.dcm")
    out = tmp_path / "deflated.dcm"
    subprocess.run(["dcmconv", "+td", str(src), str(out)], check=True)
    ours = dcmread_bounded(out, force=False, max_pixel_bytes=128 * MIB)
    theirs = pydicom.dcmread(out)
    assert ours == theirs
    assert str(ours.file_meta.TransferSyntaxUID) == DEFLATED
    assert np.array_equal(ours.pixel_array, pydicom.dcmread(src).pixel_array)


def test_a_deflate_bomb_upload_fails_clearly_without_inflating():
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    ds.Rows, ds.Columns = 512, 512
    data = _part10_deflated(ds, _bomb_body(ds, 1024 * MIB))
    assert len(data) < 2 * MIB
    _peak_rss_reset()
    before = _peak_rss()
    with pytest.raises(CorruptPixelData, match="inflates past the size its header declares"):
        decode(data)
    assert _peak_rss() - before <= 64 * MIB


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda d: d[:-5000], "cut short"),
        (lambda d: d + b"\x00\x00\x00", "bytes follow"),
        (lambda d: d[:50] + b"\xff" * 8 + d[58:], "corrupt|inflates past|cut short"),
    ],
    ids=["cut", "trailing-bytes", "corrupt"],
)
def test_broken_deflate_streams_are_refused(mangle, message):
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    body = zlib.compress(fp.getvalue())[2:-4]  # raw deflate
    with pytest.raises(InflateError, match=message):
        inflate(io.BytesIO(mangle(body)), io.BytesIO(), 128 * MIB)
