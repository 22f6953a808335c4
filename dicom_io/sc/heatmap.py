"""One finding's heatmap over the radiograph, as a Secondary Capture in the source's study.

A PACS viewer cannot overlay our RGBA heatmaps, so the overlay is burned into an RGB image on
the source's own pixel grid (same rows and columns, same pixel spacing and orientation, no
letterbox), with a banner across the top that says what it is.  Burned In Annotation is YES.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from dicom_io.derived import MANUFACTURER, Algorithm, derived_uid, finish_derived, quiet_person_names
from dicom_io.pixels import render_display
from settings import PixelsConfig

HEATMAP_BANNER = "AI heatmap – not for diagnostic use"
SC_SERIES_BASE = 9910
# Heat reaches at most this share of a pixel's colour: the anatomy under it stays readable.
OVERLAY_OPACITY = 0.45
# Orientation when the source carries none (a CR may leave it empty): a PA chest as displayed.
_UNKNOWN_ORIENTATION = ("L", "F")


@dataclass(frozen=True)
class HeatmapCapture:
    """What one heatmap image shows and where it belongs."""

    source: Dataset  # the source instance, pixels included
    heat_rgba: np.ndarray  # (h, w, 4) uint8, aligned with the whole image (letterbox already cut)
    finding: str  # the finding's name (part of the UIDs)
    finding_display: str
    finding_index: int  # the finding's place in the model's outputs: its series number
    algorithm: Algorithm
    when: datetime
    instance_number: int = 1


def capture_uids(capture: HeatmapCapture) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID), one series per finding and model in the study."""
    study = str(capture.source.StudyInstanceUID)
    ref = capture.algorithm.ref
    series = derived_uid("sc-series", study, ref, capture.finding)
    return series, derived_uid("sc", str(capture.source.SOPInstanceUID), ref, capture.finding)


def _banner_font(height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, int(height * 0.6)))


def overlay(grey: np.ndarray, heat_rgba: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) uint8: the heat, stretched onto the image, blended over the grey levels."""
    rows, cols = grey.shape
    heat = Image.fromarray(np.ascontiguousarray(heat_rgba), mode="RGBA").resize((cols, rows), Image.Resampling.BILINEAR)
    rgba = np.asarray(heat, dtype=np.float32) / 255.0
    alpha = rgba[..., 3:4] * OVERLAY_OPACITY
    base = (grey.astype(np.float32) / 255.0)[..., None]
    out = base * (1.0 - alpha) + rgba[..., :3] * alpha
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def burn_banner(rgb: np.ndarray, text: str) -> np.ndarray:
    """`rgb` with a black band across the top carrying `text` in white, sized to the image."""
    rows, cols = rgb.shape[:2]
    height = max(16, rows // 28)
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, cols, height), fill=(0, 0, 0))
    font = _banner_font(height)
    while font.getlength(text) > cols - 8 and getattr(font, "size", 10) > 8:
        font = ImageFont.load_default(size=int(font.size * 0.9))  # type: ignore[union-attr]
    draw.text((6, height // 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    return np.asarray(image)


def _spacing(source: Dataset) -> list[float] | None:
    """The source's pixel spacing (Pixel Spacing, else Imager Pixel Spacing) when it is a real one."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(v) for v in source.get(keyword) or []]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(v > 0 for v in values):
            return values
    return None  # absent or zero (seen in real CR headers): better none than a false one


def build_heatmap_capture(capture: HeatmapCapture, limits: PixelsConfig | None = None) -> hd.sc.SCImage:
    """The Secondary Capture for `capture`: RGB, the source's geometry, banner burned in."""
    source = capture.source
    rows, cols = int(source.Rows), int(source.Columns)
    grey = render_display(source, max_size=max(rows, cols), limits=limits)
    if grey.shape != (rows, cols):
        raise ValueError(f"rendered {grey.shape}, expected the source's {(rows, cols)}")
    algorithm = capture.algorithm
    # Pillow's built-in font has no en dash: the burned-in line uses a hyphen.
    text = f"{HEATMAP_BANNER} · {capture.finding_display} · {algorithm.name} {algorithm.version}".replace("–", "-")
    pixels = burn_banner(overlay(grey, capture.heat_rgba), text)
    orientation = [str(v) for v in source.get("PatientOrientation") or []]
    series_uid, sop_uid = capture_uids(capture)
    with quiet_person_names():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=SC_SERIES_BASE + capture.finding_index,
            sop_instance_uid=sop_uid,
            instance_number=capture.instance_number,
            manufacturer=MANUFACTURER,
            patient_orientation=tuple(orientation) if len(orientation) == 2 else _UNKNOWN_ORIENTATION,  # type: ignore[arg-type]
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
    if len(orientation) != 2:
        sc.PatientOrientation = None  # type: ignore[assignment] # Type 2: empty says "unknown" rather than guessing
    spacing = _spacing(source)
    if spacing is not None:
        sc.PixelSpacing = spacing  # type: ignore[assignment]
    sc.Laterality = source.get("Laterality") or None  # type: ignore[assignment] # Type 2C: empty when the source says nothing
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "SYN"
    sc.ImageType = ["DERIVED", "SECONDARY", "HEATMAP"]
    sc.DerivationDescription = f"Grad-CAM heatmap of {capture.finding_display} by {algorithm.ref}; {HEATMAP_BANNER}"[
        :1024
    ]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    finish_derived(sc, algorithm, capture.when, f"AI heatmap {capture.finding_display} {algorithm.name}")
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = sc.ContentDate, sc.ContentTime
    return sc
