"""What the browser viewer fetches: the radiograph's values (16-bit, gzip) and the heatmap legend.

The values travel as little-endian uint16 behind ``Content-Encoding: gzip`` (the browser
inflates them itself) with the geometry and default window in ``X-Viewer-*`` headers, so one
request gives the viewer everything it needs to window the image.  A larger size is asked for
when the radiologist zooms in (full resolution at most); each rendering is cached by file
digest and size, as decoding a JPEG 2000 CR takes about a second.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_io.viewer import viewer_image
from models.heatmap_image import ramp
from settings import PixelsConfig
from worklist.imaging import Lru

# The sizes a viewer may ask for (longer side); the image is never upscaled beyond its own.
SIZES = (1024, 2048, 4096)
_CACHE: Lru[tuple[bytes, dict[str, str]]] = Lru(8)


def viewer_payload(path: Path, digest: str, size: int, limits: PixelsConfig) -> tuple[bytes, dict[str, str]]:
    """(gzip body, headers) of the instance's values at `size`."""
    key = f"{digest}:{size}"
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    image = viewer_image(path, size, limits)
    body = gzip.compress(np.ascontiguousarray(image.values, dtype="<u2").tobytes(), compresslevel=1)
    headers = {
        "X-Viewer-Rows": str(image.shape[0]),
        "X-Viewer-Columns": str(image.shape[1]),
        "X-Viewer-Full-Rows": str(image.full_shape[0]),
        "X-Viewer-Full-Columns": str(image.full_shape[1]),
        "X-Viewer-Low": repr(image.low),
        "X-Viewer-High": repr(image.high),
        "X-Viewer-Window-Center": repr(image.center),
        "X-Viewer-Window-Width": repr(image.width),
        "X-Viewer-Window-Source": image.window_source,
        "X-Viewer-Invert": "1" if image.invert else "0",
    }
    _CACHE.put(key, (body, headers))
    return body, headers


def legend_png(width: int = 256, height: int = 12) -> bytes:
    """The heatmap colour ramp, low heat on the left: drawn by the same ``ramp`` as the overlays."""
    heat = np.linspace(0.0, 1.0, width, dtype=np.float32)
    rgb = (ramp(heat) * 255.0 + 0.5).astype(np.uint8)
    strip = np.repeat(rgb[np.newaxis, :, :], height, axis=0)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return buf.getvalue()
