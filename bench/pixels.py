"""bench/pixels: median ms per image of the full pixel path vs the bare decode.

Files: a 2500x2048 16-bit uncompressed DX For Presentation (built from the real RG1 CR,
resampled and inverted to MONOCHROME2, no window: the percentile window runs), the RG1
JPEG 2000 lossless CR, and the SIIM JPEG baseline CR.  Baselines, same run, interleaved:
``dcmread(path).pixel_array`` (what a naive loader does) and ``pixel_array`` alone on an
already-parsed dataset.  Goals: full path <= 1.3x the bare decode for the uncompressed DX;
<= 0.6x the bare *full* decode for JPEG 2000 and JPEG, whose model path decodes only the
resolution the model needs (dicom_io.reduced).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.pixels import to_model_tensor

REPO = Path(__file__).resolve().parents[1]
SIIM = REPO.parent / "shared" / "data" / "dicom" / "siim_cr_chest_pa_jpeg_baseline.dcm"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def build_dx(out: Path) -> Path:
    """2500x2048 16-bit DX from the real RG1 chest: resampled, MONOCHROME1 -> 2, 16 bits."""
    rg1 = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    raw = rg1.pixel_array.astype(np.float32)
    big = np.asarray(Image.fromarray(raw, "F").resize((2048, 2500), Image.Resampling.BILINEAR))
    pixels = np.clip((32767.0 - big) * 2.0, 0, 65535).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def measure(path: Path, repeats: int) -> dict[str, float]:
    parsed = pydicom.dcmread(path)
    full, bare, array_only = [], [], []
    to_model_tensor(path)  # warm caches and imports
    for _ in range(repeats):
        t0 = time.perf_counter()
        to_model_tensor(path)
        t1 = time.perf_counter()
        _ = pydicom.dcmread(path).pixel_array
        t2 = time.perf_counter()
        parsed._pixel_array, parsed._pixel_id = None, {}
        _ = parsed.pixel_array
        t3 = time.perf_counter()
        full.append(t1 - t0)
        bare.append(t2 - t1)
        array_only.append(t3 - t2)
    result = {
        "full_path_ms": _median_ms(full),
        "bare_decode_ms": _median_ms(bare),
        "pixel_array_only_ms": _median_ms(array_only),
    }
    result["ratio_vs_bare"] = round(result["full_path_ms"] / result["bare_decode_ms"], 2)
    result["ratio_vs_pixel_array_only"] = round(result["full_path_ms"] / result["pixel_array_only_ms"], 2)
    return result


def main() -> dict:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "dx_2500x2048_16bit_uncompressed": (build_dx(Path(tmp) / "dx.dcm"), 40, 1.3),
            "rg1_cr_jpeg2000_lossless": (Path(get_testdata_file("RG1_J2KR.dcm")), 7, 0.6),
            "siim_cr_jpeg_baseline": (SIIM, 30, 0.6),
        }
        for name, (path, repeats, goal) in files.items():
            if not path.exists():
                print(f"{name}: {path} not found, skipped")
                continue
            results[name] = measure(path, repeats)
            r = results[name]
            r["goal_ratio_vs_bare"], r["met"] = goal, r["ratio_vs_bare"] <= goal
            print(
                f"{name:34s} full {r['full_path_ms']:8.2f} ms | dcmread+pixel_array {r['bare_decode_ms']:8.2f} ms"
                f" (x{r['ratio_vs_bare']}) | pixel_array alone {r['pixel_array_only_ms']:8.2f} ms"
                f" (x{r['ratio_vs_pixel_array_only']}) | goal x{goal} vs dcmread+pixel_array:"
                f" {'met' if r['met'] else 'NOT met'}",
                flush=True,
            )
    return results
