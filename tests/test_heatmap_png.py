"""Heatmap pictures for the viewer: the RGBA colour ramp and the letterbox crop.

The worker stores ``colorize(map)`` at the model's 224x224 (padding included); the viewer cuts
the padding with ``crop_letterbox`` and stretches the rest onto its own rendering, so the crop
must reproduce the pixel path's letterbox geometry exactly, on real images too.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_io.pixels import DEFAULT_INPUT_SIZE, load_image, to_model_tensor
from dicom_io.resize import letterbox
from models.gradcam import overlay
from models.heatmap_image import colorize, crop_letterbox
from tests.conftest import pydicom_data_file, shared_file

SIZE = DEFAULT_INPUT_SIZE


def test_colorize_is_rgba_uint8_with_alpha_growing_with_the_heat() -> None:
    heat = np.tile(np.linspace(0.0, 1.0, SIZE, dtype=np.float32), (SIZE, 1))
    rgba = colorize(heat)
    assert rgba.shape == (SIZE, SIZE, 4) and rgba.dtype == np.uint8
    alpha = rgba[0, :, 3].astype(int)
    assert np.all(np.diff(alpha) >= 0), "alpha must never fall as the heat rises"
    assert alpha[0] == 0 and alpha[-1] == 255
    assert np.all(colorize(np.zeros((8, 8), np.float32))[..., 3] == 0), "no heat, nothing drawn"
    # Out-of-range values (an un-normalised foreign map) are clipped, not wrapped around.
    assert colorize(np.array([[-3.0, 7.0]], np.float32))[..., 3].tolist() == [[0, 255]]


def test_colorize_and_overlay_share_one_ramp() -> None:
    heat = np.linspace(0.0, 1.0, 50, dtype=np.float32)[None, :]
    rgba = colorize(heat)
    # overlay with alpha 1 over a black image is the ramp scaled by the heat.
    blended = overlay(np.zeros_like(heat), heat, alpha=1.0)
    expected = rgba[..., :3].astype(np.float32) / 255.0 * heat[..., None]
    np.testing.assert_allclose(blended, expected, atol=1 / 255)
    hot, cold = rgba[0, -1, :3].astype(int), rgba[0, 0, :3].astype(int)
    assert hot[0] > 0 and hot[1] == hot[2] == 0, "jet: red when hot"
    assert cold[2] > 0 and cold[0] == cold[1] == 0, "jet: blue when cold"


@pytest.mark.parametrize(
    "shape", [(2500, 2048), (1955, 1841), (4000, 301), (2048, 2500), (1024, 2048), (7, 3000), (512, 512), (223, 223)]
)
def test_crop_letterbox_keeps_the_aspect_and_only_the_image(shape: tuple[int, int]) -> None:
    rows, cols = shape
    canvas = letterbox(np.ones(shape, dtype=np.float32), SIZE)  # the pixel path's own geometry
    cropped = crop_letterbox(canvas, shape)
    assert max(cropped.shape) == SIZE
    # Same aspect as the original, within one pixel on the shorter side.
    if rows >= cols:
        assert abs(cropped.shape[1] - SIZE * cols / rows) <= 1
    else:
        assert abs(cropped.shape[0] - SIZE * rows / cols) <= 1
    assert np.all(cropped > 0), "padding left inside the crop"
    assert np.isclose(canvas.sum(), cropped.sum()), "image cut off by the crop"


def test_crop_letterbox_keeps_channels_and_rejects_non_square() -> None:
    rgba = colorize(np.ones((SIZE, SIZE), np.float32))
    assert crop_letterbox(rgba, (2000, 1000)).shape == (SIZE, SIZE // 2, 4)
    with pytest.raises(ValueError, match="square"):
        crop_letterbox(np.zeros((SIZE, SIZE // 2)), (2000, 1000))


def _png_bytes(grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grey)).save(buf, format="PNG")
    return buf.getvalue()


def _real_sources() -> list[tuple[str, Path | bytes]]:
    nih = np.asarray(Image.open(sorted(shared_file("nih-findings", "images").glob("*.png"))[0]).convert("L"))
    return [
        ("portrait CR (RG1, 1955x1841)", pydicom_data_file("RG1_UNCR.dcm")),
        ("square CR (SIIM)", shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")),
        ("landscape crop of an NIH film", _png_bytes(nih[128:384, :])),
        ("tall crop of an NIH film", _png_bytes(nih[:, 160:352])),
    ]


def test_crop_of_the_model_tensor_leaves_no_padding_on_real_images() -> None:
    for name, source in _real_sources():
        image_shape = load_image(source).shape
        tensor = to_model_tensor(source)[..., 0]
        cropped = crop_letterbox(tensor, image_shape)
        padded = tensor.size != cropped.size
        assert not np.any(np.all(cropped == 0, axis=1)), f"{name}: an all-zero padding row survived"
        assert not np.any(np.all(cropped == 0, axis=0)), f"{name}: an all-zero padding column survived"
        # Everything cut away was padding (zero), so the heatmap keeps its pixel alignment.
        assert np.isclose(tensor.sum(), cropped.sum()), name
        if name.startswith(("portrait", "landscape", "tall")):
            assert padded, f"{name}: expected letterbox padding to remove"
