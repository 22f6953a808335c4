"""The out-of-scope check on PNG/JPEG files (``dicom_io.image_scope``), on real images.

Real chest films of every collection must pass, the extreme ones included (the widest, the
smallest, the flattest); a real colour photograph must not, nor a real film cut into a strip,
shrunk to a thumbnail or washed out.  The images are decoded with the pixel path's decoder,
as the scoring service decodes them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw

from dicom_io.decode import decode
from dicom_io.image_scope import check_image_scope, measure_image, scope_reasons
from settings import ConfigError, HeaderlessImageConfig, load_settings
from tests.conftest import pydicom_data_file, shared_file
from worklist.reasons import plain_reason

RULES = HeaderlessImageConfig()
COLLECTIONS = (
    ("kermany", "train", "NORMAL"),
    ("kermany", "train", "PNEUMONIA"),
    ("nih-findings", "images"),
    ("covid", "actualmed", "images"),
    ("covid", "figure1", "images"),
    ("covid", "hannover", "images"),
    ("adult-normals-rsna", "images"),
    ("ieee8023-noncovid", "images"),
)
# The extremes of all 12,249 training films (scripts/measure_image_scope.py).
EXTREMES = (
    ("covid", "figure1", "images", "COVID-00020.png"),  # the widest: 512x291, 1.76 to 1
    ("covid", "actualmed", "images", "CR.1.2.840.113564.1722810170.202003241816485934.1003000225002.png"),  # 1.72
    ("covid", "figure1", "images", "COVID-00048.png"),  # 224x224, the smallest size there is
    ("covid", "hannover", "images", "80b5f00f.png"),  # the least contrast: 1st..99th percentile 0.25
    ("kermany", "train", "PNEUMONIA", "person636_bacteria_2527.jpeg"),  # Kermany's least contrast, RGB JPEG
)
PER_COLLECTION = 12
FILM = ("nih-findings", "images", "00000075_000.png")  # a 512x512 adult film to cut and shrink


def pixels_of(path: Path) -> np.ndarray:
    return pixels_of_bytes(path.read_bytes())


def pixels_of_bytes(data: bytes) -> np.ndarray:
    """As the scoring service decodes a PNG or JPEG: the stored channels and bit depth."""
    return decode(data).array


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def photograph() -> Path:
    """Grace Hopper's portrait, a real colour photograph that ships with matplotlib."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.exists():
        pytest.skip(f"matplotlib's sample photograph is not installed: {path}")
    return path


def real_films() -> list[Path]:
    films = []
    for parts in COLLECTIONS:
        folder = shared_file(*parts)
        films += sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:PER_COLLECTION]
    return films + [shared_file(*parts) for parts in EXTREMES]


def test_real_chest_films_of_every_collection_are_in_scope() -> None:
    films = real_films()
    assert len(films) == PER_COLLECTION * len(COLLECTIONS) + len(EXTREMES)
    for path in films:
        verdict = check_image_scope(pixels_of(path))
        assert verdict.eligible, (path.name, verdict.reason)
    # Kermany's films are grey saved as RGB JPEGs: three equal channels, no colour at all.
    kermany = pixels_of(shared_file(*EXTREMES[-1]))
    assert kermany.ndim == 3 and measure_image(kermany, RULES.colour_level).coloured_share == 0.0
    widest = measure_image(pixels_of(shared_file(*EXTREMES[0])), RULES.colour_level)
    assert (widest.columns, widest.rows) == (512, 291) and widest.aspect < RULES.max_aspect


def test_a_colour_photograph_is_refused_in_words() -> None:
    photo = pixels_of(photograph())
    assert photo.ndim == 3  # decoded as RGB, as the service decodes it
    m = measure_image(photo, RULES.colour_level)
    assert m.coloured_share > 0.4  # 55 % of its pixels are coloured; no training film has one
    verdict = check_image_scope(photo)
    assert not verdict.eligible
    assert verdict.reason == "ineligible: colour image, not a radiograph"
    assert plain_reason("ineligible", verdict.reason) == "outside what the model reads: colour image, not a radiograph"


def test_grey_saved_as_rgb_and_a_few_coloured_marks_stay_in_scope() -> None:
    """A real film saved as RGB with equal channels is grey; red arrows drawn on it by a
    teaching site (under 5 % of the pixels) do not make it a colour picture."""
    grey = pixels_of(shared_file(*FILM))
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    assert check_image_scope(pixels_of_bytes(png(rgb))).eligible
    marked = Image.fromarray(rgb)
    draw = ImageDraw.Draw(marked)
    for y in (100, 250, 400):
        draw.line([(60, y), (160, y + 40)], fill=(255, 0, 0), width=6)
    arr = pixels_of_bytes(png(np.asarray(marked)))
    share = measure_image(arr, RULES.colour_level).coloured_share
    assert 0.0 < share < RULES.max_colour_share
    assert check_image_scope(arr).eligible


def test_a_film_cut_into_a_strip_is_refused_with_its_proportions() -> None:
    film = pixels_of(shared_file(*FILM))  # 512x512
    wide = film[150:350, :]  # 512 wide, 200 tall
    verdict = check_image_scope(wide)
    assert verdict.reason == "ineligible: image 2.6 times as wide as tall"
    tall = film[:, 200:430]  # 230 wide, 512 tall
    assert check_image_scope(tall).reason == "ineligible: image 2.2 times as tall as wide"
    assert check_image_scope(film[:, 100:356]).eligible  # a square crop is a film still


def test_a_thumbnail_is_refused() -> None:
    film = Image.open(shared_file(*FILM))
    thumb = pixels_of_bytes(png(np.asarray(film.resize((100, 100), Image.Resampling.LANCZOS))))
    verdict = check_image_scope(thumb)
    assert verdict.reason == "ineligible: image too small (100x100 pixels, at least 128 on each side)"
    assert check_image_scope(pixels_of_bytes(png(np.asarray(film.resize((224, 224)))))).eligible


def test_a_washed_out_or_blank_image_is_refused() -> None:
    film = pixels_of(shared_file(*FILM)).astype(np.uint16)
    washed = (200 + film // 32).astype(np.uint8)  # the film's levels squeezed into 8 of 255
    assert measure_image(washed, RULES.colour_level).contrast < RULES.min_contrast
    assert check_image_scope(washed).reason == "ineligible: image nearly blank (almost no contrast)"
    blank = np.full((512, 512), 255, dtype=np.uint8)
    assert check_image_scope(blank).reasons == ("image nearly blank (almost no contrast)",)


def test_a_deep_png_is_judged_on_the_bits_it_uses() -> None:
    """A 15-bit CR saved as a 16-bit PNG: its contrast is measured against 15 bits, not 16."""
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    deep = np.ascontiguousarray(ds.pixel_array.astype(np.uint16))
    decoded = pixels_of_bytes(png(deep))
    assert decoded.dtype == np.uint16 and int(decoded.max()) < 2**15
    assert check_image_scope(decoded).eligible


def test_every_failed_bound_is_named_once() -> None:
    photo = Image.open(photograph())
    strip = np.asarray(photo.convert("RGB").resize((300, 100)))
    reasons = scope_reasons(measure_image(strip, RULES.colour_level), RULES)
    assert reasons == [
        "colour image, not a radiograph",
        "image too small (300x100 pixels, at least 128 on each side)",
        "image 3.0 times as wide as tall",
    ]


def test_a_site_tunes_the_bounds_in_its_configuration(tmp_path: Path) -> None:
    film = pixels_of(shared_file(*FILM))
    wide = film[150:350, :]
    env = {"XRAY_TRIAGE_ELIGIBILITY__HEADERLESS__MAX_ASPECT": "3.0"}
    settings = load_settings(None, env)
    assert settings.eligibility.headerless.max_aspect == 3.0
    assert check_image_scope(wide, settings.eligibility.headerless).eligible
    config = tmp_path / "site.yaml"
    config.write_text("eligibility:\n  headerless:\n    min_side: 300\n")
    assert not check_image_scope(film[:290, :290], load_settings(config, {}).eligibility.headerless).eligible
    for bad in ({"max_aspect": 0.5}, {"min_contrast": 1.0}, {"max_colour_share": 2}, {"min_side": 0}):
        (key,) = bad
        with pytest.raises(ConfigError, match=f"eligibility.headerless.{key}"):
            load_settings(None, {f"XRAY_TRIAGE_ELIGIBILITY__HEADERLESS__{key.upper()}": str(bad[key])})
