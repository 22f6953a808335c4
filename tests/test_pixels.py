"""The pixel path on real radiographs: encodings agree, orientation of grey levels is right,
and equivalent encodings of the same pixels (MONOCHROME1 copies, 16-bit DICOM of a JPEG,
grey stored as RGB, rescale vs none) give the same tensor."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_io.pixels import (
    DEFAULT_INPUT_SIZE,
    PIPELINE_VERSION,
    PixelResult,
    load_image,
    render_display,
    to_model_tensor,
)
from dicom_io.resize import fit_shape
from tests.conftest import shared_file
from tests.plugins.pixels import dataset_bytes, dicom_from_pixels, full_tensor

# JPEG 2000 lossy (RG1_J2KI) against the uncompressed original, on the [0, 1] tensor:
# measured max 0.00086, mean 0.00015; allowed max 0.005 (~1.3 of 255 display levels).
J2K_LOSSY_MAX = 0.005
J2K_LOSSY_MEAN = 0.001


def lungs_and_spine(tensor: np.ndarray) -> tuple[float, float]:
    """Mean of both lung fields and of the spine/mediastinum strip at mid-lung height of a
    square frontal chest letterboxed to 224 (regions checked by eye on the real images)."""
    t = tensor[..., 0]
    rows = slice(60, 130)
    lungs = (t[rows, 45:85].mean() + t[rows, 140:180].mean()) / 2
    return float(lungs), float(t[rows, 104:120].mean())


def test_contract_shape_range_version(rg1) -> None:
    tensor = to_model_tensor(rg1["UNCR"])
    assert tensor.shape == (DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE, 1)
    assert tensor.dtype == np.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    result = load_image(rg1["UNCR"])
    assert isinstance(result, PixelResult)
    assert result.pipeline_version == PIPELINE_VERSION
    assert result.image.shape == (1955, 1841) and result.image.dtype == np.float32
    assert result.photometric == "MONOCHROME1" and result.frames == 1 and result.frame_used == 0
    assert result.window.source == "Window Center/Width" and result.window.center == 15000
    assert any(s.startswith("MONOCHROME1: inverted") for s in result.steps)
    assert any(s.startswith("bits stored: low 15") for s in result.steps)


def test_rg1_uncompressed_and_j2k_lossless_identical(rg1) -> None:
    reference = to_model_tensor(rg1["UNCR"])
    np.testing.assert_array_equal(full_tensor(rg1["J2KR"]), reference)
    # UNCI is the lossy J2KI decompressed and stored uncompressed: equal to J2KI, not to UNCR.
    np.testing.assert_array_equal(to_model_tensor(rg1["UNCI"]), full_tensor(rg1["J2KI"]))


def test_rg1_j2k_lossy_is_close(rg1) -> None:
    diff = np.abs(full_tensor(rg1["J2KI"]) - to_model_tensor(rg1["UNCR"]))
    assert diff.max() <= J2K_LOSSY_MAX
    assert diff.mean() <= J2K_LOSSY_MEAN
    assert diff.max() > 0  # it is lossy; equality would mean we decoded the wrong file


@pytest.mark.parametrize("name", ["siim_path", "nema_path", "rg1"])
def test_lungs_dark_bone_bright(name, request) -> None:
    source = request.getfixturevalue(name)
    source = source["UNCR"] if isinstance(source, dict) else source
    lungs, spine = lungs_and_spine(to_model_tensor(source))
    assert spine - lungs >= 0.15, (lungs, spine)


def test_nema_without_file_meta_reads_from_path_bytes_and_dataset(nema_path) -> None:
    expected = to_model_tensor(nema_path)
    data = nema_path.read_bytes()
    assert data[128:132] != b"DICM"
    np.testing.assert_array_equal(to_model_tensor(data), expected)
    np.testing.assert_array_equal(to_model_tensor(io.BytesIO(data)), expected)
    np.testing.assert_array_equal(to_model_tensor(str(nema_path)), expected)
    ds = pydicom.dcmread(nema_path, force=True)
    np.testing.assert_array_equal(to_model_tensor(ds), expected)
    assert "TransferSyntaxUID" not in ds.file_meta  # the caller's dataset is not mutated


def test_preamble_is_optional(siim_path) -> None:
    data = siim_path.read_bytes()
    assert data[128:132] == b"DICM"
    np.testing.assert_array_equal(to_model_tensor(data[132:]), to_model_tensor(data))


def test_monochrome1_copy_equals_monochrome2_original(siim_path) -> None:
    """Percentile window (the SIIM CR has no VOI): inverted pixels, MONOCHROME1."""
    ds = pydicom.dcmread(siim_path)
    pixels = ds.pixel_array
    mono2 = dicom_from_pixels(pixels)
    mono1 = dicom_from_pixels(255 - pixels, photometric="MONOCHROME1")
    a, b = to_model_tensor(mono2), to_model_tensor(mono1)
    assert load_image(mono1).window.source == "percentile"
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, full_tensor(siim_path), atol=1e-6)


def test_monochrome2_copy_of_windowed_monochrome1(nema_path) -> None:
    """With a LINEAR window the inverted copy needs the mirrored centre c' = max + 1 - c."""
    ds = pydicom.dcmread(nema_path, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    pixels = ds.pixel_array & 0x3FF
    mono2 = dicom_from_pixels(
        (1023 - pixels).astype(np.uint16), bits_stored=10, WindowCenter=1023 + 1 - 550, WindowWidth=1024
    )
    np.testing.assert_allclose(to_model_tensor(mono2), to_model_tensor(nema_path), atol=1e-5)


def test_16bit_dicom_of_kermany_image_equals_the_image(kermany_jpeg) -> None:
    """A 16-bit MONOCHROME2 DICOM without VOI of a JPEG's pixels (v*257) gets the same
    percentile rule as the JPEG, in its own units, so it renders like the 8-bit original."""
    grey = np.asarray(Image.open(kermany_jpeg).convert("L"))
    ds = dicom_from_pixels(grey.astype(np.uint16) * 257)
    np.testing.assert_allclose(to_model_tensor(ds), to_model_tensor(kermany_jpeg), atol=1e-5)
    png = io.BytesIO()
    Image.fromarray(grey).save(png, format="PNG")
    np.testing.assert_allclose(to_model_tensor(png.getvalue()), to_model_tensor(kermany_jpeg), atol=1e-6)


@pytest.mark.parametrize(
    "parts",
    [
        ("nih-findings", "images", "00000075_000.png"),
        ("adult-normals-rsna", "images", "Normal-2.jpg"),
        ("ieee8023-noncovid", "images", "ARDSSevere.jpg"),
    ],
)
def test_voi_less_dicom_scores_like_the_png_or_jpeg_of_its_pixels(parts) -> None:
    """One rule for every image without a VOI: an 8-bit DICOM of a real PNG's or JPEG's pixels
    gives the same tensor as the file itself (before, DICOM got a percentile window and PNG/JPEG
    the full range, so a model trained on PNGs was served other pixels from the PACS)."""
    path = shared_file(*parts)
    grey = np.asarray(Image.open(path).convert("L"))
    ds = dicom_from_pixels(grey, modality="OT")
    assert load_image(ds).window.source == "percentile"
    assert load_image(path).window.source == "percentile"
    np.testing.assert_allclose(to_model_tensor(ds), to_model_tensor(path), atol=1e-6)
    np.testing.assert_allclose(render_display(ds), render_display(path), atol=1)


def test_grey_stored_as_rgb_equals_grey(nih_png) -> None:
    grey = Image.open(nih_png).convert("L")
    rgb = io.BytesIO()
    grey.convert("RGB").save(rgb, format="PNG")
    result = load_image(rgb.getvalue())
    assert "grey stored as RGB" in " ".join(result.steps)
    np.testing.assert_array_equal(to_model_tensor(rgb.getvalue()), to_model_tensor(nih_png))


def test_rgb_dicom_of_grey_equals_grey_dicom(nih_png) -> None:
    grey = np.asarray(Image.open(nih_png).convert("L"))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    a = to_model_tensor(dicom_from_pixels(rgb, photometric="RGB"))
    b = to_model_tensor(dicom_from_pixels(grey))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_true_colour_becomes_bt601_luma(nih_png) -> None:
    grey = np.asarray(Image.open(nih_png).convert("L")).astype(np.float32)
    rgb = np.stack([grey, grey * 0.5, grey * 0.25], axis=2).round().astype(np.uint8)
    result = load_image(dicom_from_pixels(rgb, photometric="RGB"))
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    # then the percentile window every VOI-less image gets
    lo, hi = result.window.center - result.window.width / 2, result.window.center + result.window.width / 2
    assert result.window.source == "percentile"
    np.testing.assert_allclose(result.image, np.clip((luma - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_sixteen_bit_png_uses_percentile_window(nih_png) -> None:
    grey = np.asarray(Image.open(nih_png).convert("L")).astype(np.uint16) * 16  # 12-bit range
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    result = load_image(buf.getvalue())
    assert result.window.source == "percentile"
    assert result.image.min() == 0.0 and result.image.max() == 1.0


def test_rescale_slope_intercept_is_applied_before_the_window(nema_path) -> None:
    ds = pydicom.dcmread(nema_path, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    pixels = (ds.pixel_array & 0x3FF).astype(np.uint16)
    rescaled = dicom_from_pixels(
        pixels,
        photometric="MONOCHROME1",
        bits_stored=10,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=2 * 550 - 100.5,  # LINEAR: the -0.5 offset maps through the slope too
        WindowWidth=2 * 1023 + 1,  # LINEAR: (w - 1) scales with the slope
    )
    np.testing.assert_allclose(to_model_tensor(rescaled), to_model_tensor(nema_path), atol=1e-5)
    assert any("Rescale Slope 2" in s for s in load_image(rescaled).steps)


def test_modality_and_voi_lut_sequences(nema_path) -> None:
    """An identity Modality LUT changes nothing; a VOI LUT built from the window matches it."""
    ds = pydicom.dcmread(nema_path, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    pixels = (ds.pixel_array & 0x3FF).astype(np.uint16)
    reference = load_image(nema_path).image

    mlut = pydicom.Dataset()
    mlut.LUTDescriptor = [1024, 0, 16]
    mlut.LUTData = list(range(1024))
    with_mlut = dicom_from_pixels(pixels, "MONOCHROME1", 10, WindowCenter=550, WindowWidth=1024)
    with_mlut.ModalityLUTSequence = [mlut]
    np.testing.assert_allclose(load_image(with_mlut).image, reference, atol=1e-5)

    levels = np.arange(1024, dtype=np.float64)
    ramp = np.clip((levels - 549.5) / 1023 + 0.5, 0, 1)
    vlut = pydicom.Dataset()
    vlut.LUTDescriptor = [1024, 0, 16]
    vlut.LUTData = np.rint(ramp * 65535).astype(int).tolist()
    with_vlut = dicom_from_pixels(pixels, "MONOCHROME1", 10)
    with_vlut.VOILUTSequence = [vlut]
    result = load_image(with_vlut)
    assert result.window.source == "VOI LUT Sequence"
    np.testing.assert_allclose(result.image, reference, atol=1e-4)


def test_sigmoid_window(nema_path) -> None:
    ds = pydicom.dcmread(nema_path, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    pixels = (ds.pixel_array & 0x3FF).astype(np.uint16)
    sig = dicom_from_pixels(pixels, "MONOCHROME2", 10, WindowCenter=550, WindowWidth=1024, VOILUTFunction="SIGMOID")
    image = load_image(sig).image
    expected = 1 / (1 + np.exp(-4 * (pixels.astype(np.float64) - 550) / 1024))
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_padding_is_excluded_from_the_percentile_window(siim_path) -> None:
    pixels = pydicom.dcmread(siim_path).pixel_array
    plain = load_image(dicom_from_pixels(pixels)).window
    padded = pixels.copy()
    padded[:, :400] = 0  # a wide collimator-like border of padding
    window = load_image(dicom_from_pixels(padded, PixelPaddingValue=0)).window
    unmarked = load_image(dicom_from_pixels(padded)).window
    inner = load_image(dicom_from_pixels(np.ascontiguousarray(pixels[:, 400:]))).window
    assert abs(window.center - inner.center) <= 1.5 and abs(window.width - inner.width) <= 3
    assert unmarked.center < plain.center  # without the attribute the border drags it down


def test_multiframe_uses_first_frame(nema_path) -> None:
    ds = pydicom.dcmread(nema_path, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    frame = (ds.pixel_array & 0x3FF).astype(np.uint16)
    stack = np.stack([frame, 1023 - frame, frame // 2])
    multi = dicom_from_pixels(stack, "MONOCHROME1", 10, WindowCenter=550, WindowWidth=1024)
    result = load_image(multi)
    assert (result.frames, result.frame_used) == (3, 0)
    assert "multi-frame: frame 1 of 3 used" in result.steps
    np.testing.assert_allclose(to_model_tensor(multi), to_model_tensor(nema_path), atol=1e-6)


def test_letterbox_centres_and_pads_with_zero(rg1) -> None:
    tensor = to_model_tensor(rg1["UNCR"], size=256)[..., 0]
    rows, cols = fit_shape(1955, 1841, 256)
    assert (rows, cols) == (256, 241)
    left = (256 - cols) // 2
    assert np.all(tensor[:, :left] == 0) and np.all(tensor[:, left + cols :] == 0)
    assert tensor[:, left : left + cols].mean() > 0.3


def test_portrait_and_landscape_keep_aspect(nih_png) -> None:
    grey = np.asarray(Image.open(nih_png).convert("L"))
    wide = np.ascontiguousarray(grey[128:384, :])  # 256x512 crop of a real film
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    tensor = to_model_tensor(buf.getvalue())[..., 0]
    assert np.all(tensor[:56] == 0) and np.all(tensor[168:] == 0)
    assert tensor[56:168].std() > 0.05


def test_render_display_is_the_same_path_at_a_larger_size(rg1) -> None:
    display = render_display(rg1["UNCR"])
    assert display.dtype == np.uint8 and display.shape == fit_shape(1955, 1841, 1024)
    small = render_display(rg1["UNCR"], max_size=224)
    tensor = to_model_tensor(rg1["UNCR"], size=224)[..., 0]
    left = (224 - small.shape[1]) // 2
    model_view = np.rint(tensor[:, left : left + small.shape[1]] * 255)
    assert np.abs(model_view - small.astype(np.float64)).max() <= 1


def test_render_display_never_upscales(nema_path) -> None:
    assert render_display(nema_path).shape == (440, 440)


def test_load_image_result_feeds_the_tensor_and_the_display(rg1) -> None:
    result = load_image(rg1["UNCR"])
    np.testing.assert_array_equal(to_model_tensor(result), to_model_tensor(rg1["UNCR"]))
    np.testing.assert_array_equal(render_display(result, 512), render_display(rg1["UNCR"], 512))


def test_dataset_round_trip_through_bytes(nih_png) -> None:
    grey = np.asarray(Image.open(nih_png).convert("L"))
    ds = dicom_from_pixels(grey)
    np.testing.assert_array_equal(to_model_tensor(dataset_bytes(ds)), to_model_tensor(ds))


@pytest.mark.parametrize("name", ["siim_path", "nema_path", "rg1", "nih_png"])
def test_fused_and_materialised_routes_are_identical(name, request) -> None:
    """The model path resizes straight from the decoded frame, strip by strip; it must give
    exactly what resizing the full-resolution float image gives."""
    source = request.getfixturevalue(name)
    source = source["UNCR"] if isinstance(source, dict) else source
    result = load_image(source)
    fused, fused_display = to_model_tensor(result), render_display(result, 300)
    assert "image" not in result.__dict__  # not materialised by the model path
    assert result.image.shape == result.shape
    np.testing.assert_array_equal(to_model_tensor(result), fused)
    np.testing.assert_array_equal(render_display(result, 300), fused_display)
