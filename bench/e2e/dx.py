"""Build DX For Presentation instances from the real shared chest images (benchmarks and tests).

The shared collections are PNG/JPEG; a PACS sends DICOM.  Upscaling a real radiograph to a
detector-sized 16-bit frame gives instances with the size and bit depth of a modern DR room
(2500x2048 by default) and the content of a real chest, so decode, transfer and scoring cost
what they cost in production.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid


def dx_from_image(
    image: Path,
    out: Path,
    *,
    rows: int = 2500,
    columns: int = 2048,
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession: str = "",
) -> Path:
    """Write `image` as a 16-bit MONOCHROME2 DX chest PA of rows x columns; returns `out`."""
    from PIL import Image

    with Image.open(image) as im:
        grey = im.convert("L").resize((columns, rows), Image.Resampling.BILINEAR)
    pixels = (np.asarray(grey, dtype=np.uint16) * 257).astype(np.uint16)  # 8 -> 16 bits, full range

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.AccessionNumber = accession
    ds.PatientID = "BENCH"
    ds.PatientName = "Bench^Synthetic"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
