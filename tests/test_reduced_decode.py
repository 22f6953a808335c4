"""Reduced-resolution decoding keeps the pixel path's contract, within a stated tolerance.

The model path decodes JPEG 2000 and JPEG DICOM frames only down to twice the model's input
(dicom_io.reduced): a JPEG 2000 resolution level, or libjpeg's scaled IDCT.  The decoder's
own low-pass filter then stands in for the first box-average of the full path, so tensors
differ slightly.  Measured on the real files below (224 px tensors in [0, 1]): mean absolute
difference 0.0004-0.0017, largest single pixel 0.014 (JPEG) and 0.05 (JPEG 2000, at sharp
collimator and label edges); the shipped model's scores moved by at most 0.011.  The bounds
asserted here are about twice those figures.  PNG and JPEG *files* (the training data) are
never reduced, so their tensors are exactly those of the full path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.codestream import first_fragment, j2k_coding
from dicom_io.errors import CorruptPixelData, PixelError
from dicom_io.pixels import load_image, model_decode_size, to_model_tensor
from dicom_io.reduced import _pillow_level_ok, largest_factor
from dicom_io.resize import fit_shape
from tests.conftest import pydicom_data_file, shared_file
from tests.plugins.pixels import full_tensor

SIZE = 224
# (file, expected reduction factor, max |diff|, mean |diff|)
CASES = [
    ("RG1_J2KR.dcm", 2, 0.10, 0.004),  # JPEG 2000 lossless, 1955x1841, 15 bit
    ("RG1_J2KI.dcm", 2, 0.10, 0.004),  # JPEG 2000 lossy
    ("RG3_J2KR.dcm", 2, 0.10, 0.004),  # 1760x1760, 10 bit
    ("siim", 2, 0.03, 0.001),  # JPEG baseline 1024x1024, 8 bit
]
SCORE_TOLERANCE = 0.025


def _path(name: str) -> Path:
    return shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm") if name == "siim" else pydicom_data_file(name)


def _full_tensor(path: Path) -> np.ndarray:
    """The full-resolution path: decode everything, then the same letterbox."""
    image = load_image(path)
    assert image.pixels.shape[:2] == image.full_shape
    return full_tensor(image, SIZE)


@pytest.mark.parametrize(("name", "factor", "max_tol", "mean_tol"), CASES, ids=[c[0] for c in CASES])
def test_reduced_tensor_is_within_tolerance_of_the_full_one(name, factor, max_tol, mean_tol) -> None:
    path = _path(name)
    reduced = load_image(path, at_least=model_decode_size(SIZE))
    rows, cols = reduced.full_shape
    assert reduced.pixels.shape == (-(-rows // factor), -(-cols // factor))
    assert "at reduced resolution" in reduced.steps[0] and f"of {rows}x{cols}" in reduced.steps[0]
    assert max(reduced.pixels.shape) >= model_decode_size(SIZE)  # never below twice the input
    got, full = to_model_tensor(path, SIZE), _full_tensor(path)
    diff = np.abs(got - full)
    assert diff.max() <= max_tol and diff.mean() <= mean_tol, (diff.max(), diff.mean())
    # Same geometry: the letterboxed rectangle comes from the full size; outside it, padding.
    fit_rows, fit_cols = fit_shape(rows, cols, SIZE)
    top, left = (SIZE - fit_rows) // 2, (SIZE - fit_cols) // 2
    for tensor in (got, full):
        inside = np.zeros((SIZE, SIZE, 1), dtype=bool)
        inside[top : top + fit_rows, left : left + fit_cols] = True
        assert not tensor[~inside].any()


def test_reduced_stored_values_keep_their_units() -> None:
    """A JPEG 2000 resolution level is a low-pass image of the stored values (Pillow's scaling
    to 16 bits undone): close to the 2x2 block means of the full decode."""
    path = pydicom_data_file("RG1_J2KR.dcm")
    full = load_image(path).pixels.astype(np.float64)
    half = load_image(path, at_least=model_decode_size(SIZE)).pixels.astype(np.float64)
    rows, cols = full.shape[0] // 2 * 2, full.shape[1] // 2 * 2
    blocks = full[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))
    coding = j2k_coding(first_fragment(pydicom.dcmread(path).PixelData) or b"")
    assert coding is not None and coding.precision == 15
    error = np.abs(half[: rows // 2, : cols // 2] - blocks)
    assert np.median(error) < 0.005 * full.max()  # same units; a missed 2x shift would be ~50 %


def test_scores_move_by_little() -> None:
    from models.registry import get_model

    model = get_model()
    paths = [_path(name) for name, *_ in CASES]
    reduced = np.stack([to_model_tensor(p, model.input_size) for p in paths])
    full = np.stack([_full_tensor(p) for p in paths])
    scores = model.keras_model.predict_on_batch(np.concatenate([reduced, full]))
    delta = np.abs(scores[: len(paths)] - scores[len(paths) :])
    assert delta.max() <= SCORE_TOLERANCE, delta


def test_files_and_uncompressed_dicom_are_never_reduced(tmp_path) -> None:
    """The training data (PNG and JPEG files) and native DICOM go through the full path unchanged."""
    for path in (
        shared_file("dicom", "nema_cr_mono1_10bit_chest_no_meta.dcm"),
        pydicom_data_file("RG1_UNCR.dcm"),
        next(iter(sorted((shared_file("kermany") / "train" / "NORMAL").glob("*.jpeg")))),
        next(iter(sorted((shared_file("nih-findings") / "images").glob("*.png")))),
    ):
        image = load_image(path, at_least=model_decode_size(SIZE))
        assert image.pixels.shape[:2] == image.full_shape, path
        np.testing.assert_array_equal(to_model_tensor(path, SIZE), _full_tensor(path))


def _outcome(path: Path, **kw: int) -> object:
    try:
        return load_image(path, **kw).full_shape
    except PixelError as exc:
        return type(exc)


def test_a_damaged_codestream_gets_the_same_outcome_as_the_full_decode(tmp_path) -> None:
    """Whatever the reduced decoder cannot read goes to the full decoder: same error, same geometry."""
    source = pydicom_data_file("RG1_J2KR.dcm")
    for damage in ("truncated", "zeroed"):
        ds = pydicom.dcmread(source)
        data = bytearray(ds.PixelData)
        if damage == "truncated":
            data = data[: len(data) // 2 // 2 * 2]
        else:  # OpenJPEG decodes damaged tile data without complaint, at either resolution
            data[len(data) // 3 : len(data) // 3 + 4096] = bytes(4096)
        ds.PixelData = bytes(data)
        broken = tmp_path / f"{damage}.dcm"
        ds.save_as(broken)
        full, reduced = _outcome(broken), _outcome(broken, at_least=model_decode_size(SIZE))
        assert full == reduced, damage
        assert full == (CorruptPixelData if damage == "truncated" else (1955, 1841))


def test_factor_and_level_choice() -> None:
    assert largest_factor(1955, 1841, 448) == 4
    assert largest_factor(1024, 1024, 448) == 2
    assert largest_factor(880, 880, 448) == 1
    assert largest_factor(2500, 2048, 448) == 4
    # Pillow's reduced size agrees with OpenJPEG's at level 1 always, at higher levels not always.
    assert all(_pillow_level_ok(n, 1) for n in range(1, 5000))
    assert _pillow_level_ok(1955, 2) and not _pillow_level_ok(1841, 2)
