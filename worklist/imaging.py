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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from dicom_io.eligibility import check_eligibility
from dicom_io.errors import PixelError
from dicom_io.pixels import load_image, render_display, to_model_tensor
from models.heatmap_image import colorize, crop_letterbox
from models.operating_points import ADULT, decide_population
from worker.config import PixelsConfig
from worker.triage import flags_for

# pydicom and the pixel path are imported above, once, when the app is built, not inside the
# endpoints: there, the first two requests of a study page (image.png and heatmaps/*.png, on
# two threads of the pool) imported pydicom's mutually dependent modules at once, and one got
# a partially initialized module (ImportError: cannot import name 'Dataset' ...).

DISPLAY_MAX = 1024
_CACHE_ENTRIES = 64


class _LruBytes:
    """A small thread-safe LRU of rendered PNGs: decoding a JPEG 2000 CR costs about a second."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)


_PNG_CACHE = _LruBytes(_CACHE_ENTRIES)


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
    """Scores and pictures for an uploaded file; nothing of it is stored."""

    kind: str
    eligible: bool
    reason: str | None
    notes: list[str]
    scores: dict[str, float]
    thresholds: dict[str, float]
    flags: dict[str, bool]
    top_findings: list[tuple[str, float]]
    # Findings whose operating point does not steer priority (worker.triage.steering_findings).
    informational: list[str]
    image_png: bytes
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
            "notes": self.notes,
            "scores": self.scores,
            "thresholds": self.thresholds,
            "flags": self.flags,
            "top_findings": [{"finding": f, "score": s} for f, s in self.top_findings],
            "informational": self.informational,
            "image_png": uri(self.image_png),
            "heatmaps": {f: uri(b) for f, b in self.heatmap_pngs.items()},
            "model": self.model,
        }


class UnreadableImage(ValueError):
    """The upload is not a DICOM, PNG or JPEG image the pixel path can read."""


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    return "dicom?"  # DICOM without a preamble is legal; the parser decides


def analyse(
    data: bytes,
    model: Any,
    points: Mapping[str, Mapping[str, float]],
    settings: Any,
    steering: Mapping[str, frozenset[str]] | None = None,
) -> Analysis:
    """Eligibility, pixel path, scores and heatmaps for one uploaded file, all in memory.

    ``points`` and ``steering`` are the thresholds and steering findings per population
    (``worker.scoring.operating_points`` / ``steering_points``): an upload is judged at the
    operating point its header's age selects, as the worker would.
    """
    kind = _sniff(data)
    notes: list[str] = []
    source: Any = data
    ds: Any = None
    eligible, reason = True, None
    if kind.startswith("dicom"):
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=kind == "dicom?")
            _ = ds.PixelData  # a DICOM object without pixels is not an image
        except (InvalidDicomError, AttributeError, EOFError, ValueError, OSError, KeyError) as exc:
            raise UnreadableImage(f"not a DICOM, PNG or JPEG image ({type(exc).__name__})") from None
        elig = check_eligibility(ds, settings.eligibility)
        eligible, reason = bool(elig.eligible), elig.reason
        notes += list(getattr(elig, "flags", ()))
        source = ds
        kind = "dicom"
    else:
        notes.append("no DICOM header")
    try:
        rendered = load_image(source, settings.pixels)
        tensor = to_model_tensor(rendered, size=model.input_size)
        shown = render_display(rendered, max_size=DISPLAY_MAX)
    except PixelError as exc:
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a decoder error on one upload is that upload's problem
        raise UnreadableImage(f"pixel data not decodable ({type(exc).__name__})") from None
    point = decide_population(ds)
    notes.append(point.note)
    thresholds = dict(points.get(point.population, points[ADULT]))
    steers = None if steering is None else steering.get(point.population, steering.get(ADULT))
    findings = list(model.card.findings)
    maps, probs = model.heatmaps(tensor[np.newaxis], findings)
    scores = {f: float(probs[0][j]) for j, f in enumerate(findings)}
    flags = flags_for(scores, thresholds) if eligible else dict.fromkeys(scores, False)
    heatmaps = {
        f: png_bytes(np.ascontiguousarray(crop_letterbox(colorize(maps[0, j]), rendered.shape)))
        for j, f in enumerate(findings)
    }
    ranked = sorted(scores.items(), key=lambda kv: kv[1] - thresholds.get(kv[0], 0.5), reverse=True)
    return Analysis(
        kind=kind,
        eligible=eligible,
        reason=reason,
        notes=notes,
        scores=scores,
        thresholds=dict(thresholds),
        flags=flags,
        top_findings=[(f, s) for f, s in ranked if flags.get(f) and (steers is None or f in steers)],
        informational=sorted(f for f in scores if steers is not None and f not in steers),
        image_png=png_bytes(shown),
        heatmap_pngs=heatmaps,
        model=model.ref,
    )
