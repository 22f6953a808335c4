"""Is a received dataset complete?  A byte-level walk of its element structure.

pydicom is deliberately lenient: a dataset cut off in the middle of its pixel data still
"reads", and the missing bytes only surface when someone decodes the image, long after we
told the modality the instance was safely stored.  This walk checks that every element's
value fits inside the received bytes and that the dataset ends exactly on an element
boundary, without decoding or even reading the values (cheap for 10-50 MB images).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

UNDEFINED = 0xFFFFFFFF
ITEM = (0xFFFE, 0xE000)
ITEM_DELIMITER = (0xFFFE, 0xE00D)
SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
PIXEL_DATA = (0x7FE0, 0x0010)
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
MAX_DEPTH = 64


class IncompleteDatasetError(ValueError):
    """The dataset is truncated or its element structure is broken."""


class _Walker:
    def __init__(self, fp: BinaryIO, end: int, little_endian: bool) -> None:
        self.fp = fp
        self.end = end
        self.e = "<" if little_endian else ">"
        self.has_pixel_data = False

    def _read(self, n: int) -> bytes:
        data = self.fp.read(n)
        if len(data) != n:
            raise IncompleteDatasetError(f"dataset ends inside an element header at byte {self.fp.tell()}")
        return data

    def _skip(self, length: int, what: tuple[int, int]) -> None:
        pos = self.fp.tell()
        if pos + length > self.end:
            raise IncompleteDatasetError(
                f"element ({what[0]:04X},{what[1]:04X}) needs {length} bytes but only {self.end - pos} remain"
            )
        self.fp.seek(length, 1)

    def _tag(self) -> tuple[int, int]:
        group, elem = struct.unpack(self.e + "HH", self._read(4))
        return group, elem

    def elements(self, implicit: bool, depth: int, until_item_end: bool) -> None:
        """Walk elements until the end of data (top level) or an item delimiter (undefined-length item)."""
        if depth > MAX_DEPTH:
            raise IncompleteDatasetError("sequences nested too deeply")
        while True:
            if not until_item_end and self.fp.tell() >= self.end:
                return
            tag = self._tag()
            if tag == ITEM_DELIMITER:
                self._read(4)
                if until_item_end:
                    return
                raise IncompleteDatasetError("item delimiter outside an item")
            if tag in (ITEM, SEQUENCE_DELIMITER):
                raise IncompleteDatasetError(f"unexpected item tag ({tag[0]:04X},{tag[1]:04X})")
            if implicit:
                vr = b""
                (length,) = struct.unpack(self.e + "L", self._read(4))
            else:
                vr = self._read(2)
                if vr in LONG_VRS:
                    self._read(2)
                    (length,) = struct.unpack(self.e + "L", self._read(4))
                elif vr.isalpha() and vr.isupper():
                    (length,) = struct.unpack(self.e + "H", self._read(2))
                else:
                    raise IncompleteDatasetError(f"element ({tag[0]:04X},{tag[1]:04X}) has no valid VR")
            if depth == 0 and tag == PIXEL_DATA:
                self.has_pixel_data = True
            if length == UNDEFINED:
                # UN of undefined length is encoded as implicit VR little endian (PS3.5 6.2.2).
                self.items(implicit or vr == b"UN", depth + 1)
            else:
                self._skip(length, tag)

    def items(self, implicit: bool, depth: int) -> None:
        """Walk the items of an undefined-length sequence or encapsulated pixel data."""
        while True:
            tag = self._tag()
            (length,) = struct.unpack(self.e + "L", self._read(4))
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM:
                raise IncompleteDatasetError(f"expected an item, found ({tag[0]:04X},{tag[1]:04X})")
            if length == UNDEFINED:
                self.elements(implicit, depth + 1, until_item_end=True)
            else:
                self._skip(length, tag)


@dataclass(frozen=True)
class Structure:
    """What the walk found: whether there is a top-level Pixel Data, and the VR encoding that walked cleanly."""

    has_pixel_data: bool
    implicit_vr: bool


def _walk(fp: BinaryIO, start: int, end: int, implicit_vr: bool, little_endian: bool) -> Structure:
    fp.seek(start)
    walker = _Walker(fp, end, little_endian)
    walker.elements(implicit_vr, 0, until_item_end=False)
    if fp.tell() != end:
        raise IncompleteDatasetError(f"dataset structure ends at byte {fp.tell()} but {end} bytes were received")
    return Structure(walker.has_pixel_data, implicit_vr)


def check_complete(fp: BinaryIO, start: int, end: int, *, implicit_vr: bool, little_endian: bool) -> Structure:
    """Raise IncompleteDatasetError unless the bytes [start, end) are a whole, well-formed dataset.

    Some equipment encodes an "explicit VR" dataset in implicit VR; pydicom reads those, so
    they are accepted here too when the whole dataset walks cleanly that way (the result says
    which encoding it was, so the header is then read the same way).
    """
    if end <= start:
        raise IncompleteDatasetError("empty dataset")
    try:
        return _walk(fp, start, end, implicit_vr, little_endian)
    except IncompleteDatasetError:
        if implicit_vr or not little_endian:
            raise
        try:
            return _walk(fp, start, end, True, True)
        except IncompleteDatasetError:
            pass
        raise
