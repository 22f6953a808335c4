"""Typed errors of the pixel path.

The worker stores the class name and message beside the instance and moves on, so every
failure a hostile or broken file can cause must surface as one of these, never as a bare
decoder exception, a MemoryError or a crash.  All derive from ``PixelError`` so a caller
can catch one type; ``ValueError`` is a base too so code that already guards bad input
with ``except ValueError`` keeps working.
"""

from __future__ import annotations


class PixelError(ValueError):
    """Base class: the instance cannot be turned into pixels; the message says why."""


class NotAnImage(PixelError):
    """Not a DICOM image, PNG or JPEG at all (or a DICOM object with no image, e.g. SR)."""


class MissingPixelData(NotAnImage):
    """A DICOM dataset without a (7FE0,0010) Pixel Data element."""


class InvalidPixelAttributes(PixelError):
    """Rows, Columns, Bits Allocated/Stored or Samples per Pixel are absent or impossible."""


class ImageTooLarge(PixelError):
    """Declared size exceeds the configured limits; refused before any allocation."""


class UnsupportedPhotometric(PixelError):
    """A Photometric Interpretation the path does not render (e.g. PALETTE COLOR, CMYK)."""


class UnsupportedTransferSyntax(PixelError):
    """No installed decoder handles this transfer syntax."""


class CorruptPixelData(PixelError):
    """The decoder rejected the data, or its output disagrees with Rows/Columns/Bits."""


class TruncatedPixelData(CorruptPixelData):
    """Fewer pixel bytes than Rows x Columns x Samples x Bits Allocated require."""
