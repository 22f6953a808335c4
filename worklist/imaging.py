"""Pictures for the viewer: radiographs through the project's pixel path, heatmaps cut to fit.

The viewer shows the radiograph as the pixel path renders it (VOI window, MONOCHROME1
inverted, aspect kept; ``dicom_io.pixels.render_display``), not the 224 px model tensor.
Stored heatmaps are aligned with the letterboxed model tensor, so before they are laid over
the display image the letterbox padding is cut away (``crop_letterbox``), after which the
two share one aspect and the browser stretches the heatmap onto the image.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pydicom
from PIL import Image

from dicom_io.pixels import render_display
from models.heatmap_image import colorize, crop_letterbox
from settings import PixelsConfig
from triage.service import FAILED, ImageInput, Scorer
from worklist.reasons import plain_reason

# pydicom and the pixel path are imported above, once, when the app is built, not inside the
# endpoints: there, the first two requests of a study page (image.png and heatmaps/*.png, on
# two threads of the pool) imported pydicom's mutually dependent modules at once, and one got
# a partially initialized module (ImportError: cannot import name 'Dataset' ...).

V = TypeVar("V")
DISPLAY_MAX = 1024
_CACHE_ENTRIES = 64


class Lru(Generic[V]):
    """A small thread-safe LRU of rendered images: decoding a JPEG 2000 CR costs about a second."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)


_PNG_CACHE: Lru[bytes] = Lru(_CACHE_ENTRIES)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def display_png(path: Path, cache_key: str, limits: PixelsConfig) -> bytes:
    """The radiograph as the viewer shows it (PNG, longer side <= 1024 px)."""
    cached = _PNG_CACHE.get(cache_key)
    if cached is not None:
        return cached
    data = png_bytes(render_display(path, max_size=DISPLAY_MAX, limits=limits))
    _PNG_CACHE.put(cache_key, data)
    return data


def image_shape(path: Path) -> tuple[int, int]:
    """(Rows, Columns) from the DICOM header, without reading the pixel data."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return int(ds.Rows), int(ds.Columns)


def heatmap_png(heatmap_file: Path, shape: tuple[int, int]) -> bytes:
    """A stored RGBA heatmap with its letterbox padding cut away, ready to lay over the image."""
    with Image.open(heatmap_file) as im:
        rgba = np.asarray(im.convert("RGBA"))
    return png_bytes(np.ascontiguousarray(crop_letterbox(rgba, shape)))


# --------------------------------------------------------------------------- analyse an image


@dataclass(frozen=True)
class Analysis:
    """Scores and pictures for an uploaded file; nothing of it is stored.

    An ineligible upload has no scores, thresholds, flags or heatmaps (empty, not absent, so
    a client reads one shape whatever the answer), only its reason: as stored by the worker
    and printed by ``predict`` (``reason``) and in words for the radiologist (``ai_reason``).
    """

    kind: str
    eligible: bool
    reason: str | None
    ai_reason: str | None
    notes: list[str]
    scores: dict[str, float]
    thresholds: dict[str, float]
    flags: dict[str, bool]
    top_findings: list[tuple[str, float]]
    # Findings whose operating point does not steer priority (triage.operating.steering_points).
    informational: list[str]
    # The priority (and its reason) the worker would give a study of this one image.
    priority: str
    priority_reason: str
    # None only for an ineligible DICOM whose pixels could not be decoded for display.
    image_png: bytes | None
    heatmap_pngs: dict[str, bytes]
    model: str

    def to_dict(self) -> dict[str, Any]:
        import base64

        def uri(b: bytes) -> str:
            return "data:image/png;base64," + base64.b64encode(b).decode("ascii")

        return {
            "kind": self.kind,
            "eligible": self.eligible,
            "reason": self.reason,
            "ai_reason": self.ai_reason,
            "notes": self.notes,
            "scores": self.scores,
            "thresholds": self.thresholds,
            "flags": self.flags,
            "top_findings": [{"finding": f, "score": s} for f, s in self.top_findings],
            "informational": self.informational,
            "priority": self.priority,
            "priority_reason": self.priority_reason,
            "image_png": None if self.image_png is None else uri(self.image_png),
            "heatmaps": {f: uri(b) for f, b in self.heatmap_pngs.items()},
            "model": self.model,
        }


class UnreadableImage(ValueError):
    """The upload is not a DICOM, PNG or JPEG image the pixel path can read."""


def analyse(data: bytes, scorer: Scorer) -> Analysis:
    """Eligibility, pixel path, scores and heatmaps for one uploaded file, all in memory.

    The scoring service (``triage.service``) judges the upload exactly as the worker would
    judge the same file pushed over DICOM: the site's eligibility rules and thresholds, at the
    operating point its header's age selects, with that point's steering findings.  An
    ineligible upload is not scored at all, as the worker would not score it; its image is
    still shown, so that the person sees what was refused.
    """
    [j] = scorer.judge([ImageInput("upload", data)], heatmaps=True, keep_image=True)
    if j.outcome == FAILED or (j.eligible and (j.scores is None or j.image is None or j.heatmaps is None)):
        raise UnreadableImage(j.reason or "not a DICOM, PNG or JPEG image")
    rendered = j.image
    shown = None if rendered is None else png_bytes(render_display(rendered, max_size=DISPLAY_MAX))
    priority, priority_reason = scorer.priority_of(j)
    unscored = Analysis(
        kind=j.kind,
        eligible=j.eligible,
        reason=j.reason,
        ai_reason=plain_reason(j.outcome, j.reason),
        notes=list(j.notes),
        scores={},
        thresholds={},
        flags={},
        top_findings=[],
        informational=[],
        priority=priority,
        priority_reason=priority_reason,
        image_png=shown,
        heatmap_pngs={},
        model=scorer.model.ref,
    )
    if not j.eligible or j.scores is None or j.heatmaps is None or rendered is None:
        return unscored
    heatmaps = {
        f: png_bytes(np.ascontiguousarray(crop_letterbox(colorize(j.heatmaps[k]), rendered.shape)))
        for k, f in enumerate(j.scores)
    }
    ranked = sorted(j.scores.items(), key=lambda kv: kv[1] - j.thresholds.get(kv[0], 0.5), reverse=True)
    return replace(
        unscored,
        scores=j.scores,
        thresholds=dict(j.thresholds),
        flags=j.flags,
        top_findings=[(f, s) for f, s in ranked if j.flags.get(f) and f in j.steering],
        informational=j.informational,
        heatmap_pngs=heatmaps,
    )
