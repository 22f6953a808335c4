"""Fixtures for the pixel-path suites: real images, DICOM built from real pixels, and
every accepted transfer syntax produced by real encoders (DCMTK, pylibjpeg-openjpeg)."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from tests.conftest import pydicom_data_file, shared_file

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

# How each accepted transfer syntax is produced from a real uncompressed file:
# (DCMTK tool and options) or "pydicom" (pydicom 3 + pylibjpeg-openjpeg encoders).
ENCODERS: dict[UID, tuple[str, ...]] = {
    ImplicitVRLittleEndian: ("dcmconv", "+ti"),
    ExplicitVRLittleEndian: ("dcmconv", "+te"),
    DeflatedExplicitVRLittleEndian: ("dcmconv", "+td"),
    ExplicitVRBigEndian: ("dcmconv", "+tb"),
    JPEGBaseline8Bit: ("dcmcjpeg", "+eb", "+q", "95"),
    JPEGExtended12Bit: ("dcmcjpeg", "+ee", "+q", "95"),
    JPEGLossless: ("dcmcjpeg", "+el", "+sv", "6"),
    JPEGLosslessSV1: ("dcmcjpeg", "+e1"),
    JPEGLSLossless: ("dcmcjpls", "+el"),
    JPEGLSNearLossless: ("dcmcjpls", "+en", "+md", "2"),
    JPEG2000Lossless: ("pydicom",),
    JPEG2000: ("pydicom",),
    RLELossless: ("dcmcrle",),
}
LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000})


def dicom_from_pixels(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str = "CR",
    **attrs: object,
) -> Dataset:
    """A minimal but valid explicit-VR-LE image dataset around real pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_STORAGE if modality == "CR" else SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "TEST"
    arr = np.ascontiguousarray(pixels)
    frames = arr.shape[0] if (arr.ndim == 3 and photometric.startswith("MONO")) else 1
    spatial = arr.shape[1:3] if frames > 1 else arr.shape[:2]
    ds.Rows, ds.Columns = int(spatial[0]), int(spatial[1])
    ds.SamplesPerPixel = 1 if photometric.startswith("MONO") else 3
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(arr.dtype, np.signedinteger) else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = arr.tobytes()
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="session")
def siim_path() -> Path:
    return shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")


@pytest.fixture(scope="session")
def nema_path() -> Path:
    return shared_file("dicom", "nema_cr_mono1_10bit_chest_no_meta.dcm")


@pytest.fixture(scope="session")
def vet_path() -> Path:
    return shared_file("dicom", "dx_for_presentation_animal_lateral.dcm")


@pytest.fixture(scope="session")
def rg1() -> dict[str, Path]:
    return {kind: pydicom_data_file(f"RG1_{kind}.dcm") for kind in ("UNCR", "UNCI", "J2KR", "J2KI")}


@pytest.fixture(scope="session")
def rg3_path() -> Path:
    return pydicom_data_file("RG3_UNCR.dcm")


@pytest.fixture(scope="session")
def kermany_jpeg() -> Path:
    folder = shared_file("kermany", "train", "NORMAL")
    return sorted(folder.glob("*.jpeg"))[0]


@pytest.fixture(scope="session")
def nih_png() -> Path:
    folder = shared_file("nih-findings", "images")
    return sorted(folder.glob("*.png"))[0]


@pytest.fixture(scope="session")
def nema_file(nema_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The NEMA CR (10-bit MONOCHROME1, no file meta) re-written as a Part 10 file, so DCMTK
    encoders can read it; pixels and window untouched."""
    ds = pydicom.dcmread(nema_path, force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = tmp_path_factory.mktemp("nema") / "nema_explicit.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="session")
def siim_uncompressed(siim_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SIIM JPEG baseline CR decompressed by DCMTK (an independent IJG decoder)."""
    out = tmp_path_factory.mktemp("siim") / "siim_explicit.dcm"
    _run_dcmtk(["dcmdjpeg", str(siim_path), str(out)])
    return out


def _run_dcmtk(cmd: list[str]) -> None:
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"DCMTK tool {cmd[0]} is not installed (apt-get install dcmtk)")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr or proc.stdout}")


@pytest.fixture(scope="session")
def encode_real(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path, UID], Path]:
    """encode(source_file, transfer_syntax) -> a new file in that syntax, cached per run."""
    cache: dict[tuple[Path, UID], Path] = {}
    folder = tmp_path_factory.mktemp("encoded")

    def encode(source: Path, ts: UID) -> Path:
        key = (source, ts)
        if key in cache:
            return cache[key]
        out = folder / f"{source.stem}_{ts}.dcm"
        tool = ENCODERS[ts]
        if tool[0] == "pydicom":
            ds = pydicom.dcmread(source)
            if ts == JPEG2000:
                ds.compress(ts, j2k_cr=[15], encoding_plugin="pylibjpeg")
            else:
                ds.compress(ts, encoding_plugin="pylibjpeg")
            ds.save_as(out, enforce_file_format=True)
        else:
            _run_dcmtk([*tool, str(source), str(out)])
        written = pydicom.dcmread(out, stop_before_pixels=True)
        assert written.file_meta.TransferSyntaxUID == ts, f"{tool} wrote {written.file_meta.TransferSyntaxUID}"
        cache[key] = out
        return out

    return encode


def full_tensor(source: Any, size: int = 224) -> np.ndarray:
    """The model tensor through a full-resolution decode: what decoders are compared on (the
    model path may decode JPEG 2000 / JPEG at reduced resolution, tests/test_reduced_decode.py)."""
    from dicom_io.pixels import load_image
    from dicom_io.resize import letterbox_transformed

    return letterbox_transformed(*load_image(source)._source(), size)[..., np.newaxis]
