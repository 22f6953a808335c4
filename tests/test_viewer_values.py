"""The viewer's values: windowed with their default window they are the model's rendering.

The browser applies window/level itself to the pre-VOI values ``/values`` sends.  These tests
window those values the way ``worklist/static/viewer.js`` does (linear, over low..high) and
compare with ``render_display``, the pipeline's own 8-bit rendering, on real files: a
MONOCHROME1 CR with a header window (RG1), the same film as JPEG 2000, a CR with no VOI
(percentile window, SIIM JPEG baseline), a 10-bit MONOCHROME1 NEMA CR, and JPEG/PNG
training images.  Then: a narrower window changes the grey levels, and the endpoint sends the
same values gzip-encoded with the geometry in its headers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_io.pixels import render_display
from dicom_io.viewer import LEVELS, ViewerImage, viewer_image
from tests.conftest import shared_file


def window_like_the_browser(image: ViewerImage, center: float, width: float, invert: bool) -> np.ndarray:
    """viewer.js ``windowLut`` + ``applyLut``, in numpy."""
    x = image.low + image.values.astype(np.float64) * ((image.high - image.low) / LEVELS)
    y = np.clip((x - (center - width / 2)) / width, 0, 1)
    return np.round((1 - y if invert else y) * 255).astype(np.uint8)


def real_files(rg1: dict[str, Path], kermany_jpeg: Path) -> dict[str, Path]:
    return {
        "RG1 uncompressed, MONOCHROME1, header window": rg1["UNCR"],
        "RG1 JPEG 2000 lossless": rg1["J2KR"],
        "SIIM CR JPEG baseline, no VOI": shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm"),
        "NEMA 10-bit MONOCHROME1 CR": shared_file("dicom", "nema_cr_mono1_10bit_chest_no_meta.dcm"),
        "Kermany JPEG": kermany_jpeg,
        "RSNA normal JPEG": next(iter(sorted(shared_file("adult-normals-rsna", "images").glob("*.jpg")))),
    }


def test_default_window_reproduces_the_models_rendering(rg1: dict[str, Path], kermany_jpeg: Path) -> None:
    for name, path in real_files(rg1, kermany_jpeg).items():
        image = viewer_image(path, 1024)
        reference = render_display(path, max_size=1024)
        assert image.shape == reference.shape, name
        shown = window_like_the_browser(image, image.center, image.width, image.invert)
        diff = np.abs(shown.astype(np.int16) - reference.astype(np.int16))
        # 16-bit quantisation of the values and rounding differ by at most a grey level or two.
        assert diff.mean() < 0.6 and np.percentile(diff, 99.9) <= 2, (name, diff.mean(), diff.max())
        assert image.low < image.high and image.width > 0, name


def test_window_level_changes_the_grey_levels(rg1: dict[str, Path]) -> None:
    image = viewer_image(rg1["UNCR"], 1024)
    assert image.invert and image.window_source == "Window Center/Width" and image.center == 15000
    default = window_like_the_browser(image, image.center, image.width, image.invert)
    narrow = window_like_the_browser(image, image.center, image.width * 0.5, image.invert)
    full = window_like_the_browser(image, (image.low + image.high) / 2, image.high - image.low, image.invert)
    saturated = {
        k: float(((v == 0) | (v == 255)).mean()) for k, v in (("narrow", narrow), ("default", default), ("full", full))
    }
    # A narrower window saturates more of the film, the whole value range none of it but its extremes.
    assert saturated["narrow"] > saturated["default"] + 0.05 and saturated["full"] <= saturated["default"], saturated
    assert np.abs(narrow.astype(int) - default).mean() > 10


def test_sizes_are_capped_at_the_images_own(rg1: dict[str, Path]) -> None:
    small = viewer_image(rg1["UNCR"], 1024)
    full = viewer_image(rg1["UNCR"], 4096)
    assert max(small.shape) == 1024 and full.shape == full.full_shape == (1955, 1841)
    assert small.full_shape == (1955, 1841)
    # Both span the same value range, so a window set on one holds on the other.
    assert small.low == pytest.approx(full.low) and small.high == pytest.approx(full.high, rel=0.02)
