"""Read the image size a compressed codestream declares, without decoding it.

Decoder plugins allocate the size the codestream says, whatever Rows/Columns say; a
hostile instance can declare 512x512 in the header and 60000x60000 in the JPEG frame
header.  Parsing the first fragment's SOF (JPEG, JPEG-LS) or SIZ (JPEG 2000) marker is a
few microseconds and lets the size limits apply to what will really be allocated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ITEM_TAG = b"\xfe\xff\x00\xe0"
# Start-of-frame markers: baseline, extended, progressive, lossless (+ arithmetic), JPEG-LS.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"


def first_fragment(pixel_data: bytes) -> bytes | None:
    """The first fragment after the Basic Offset Table item of encapsulated Pixel Data."""
    if len(pixel_data) < 8 or not pixel_data.startswith(ITEM_TAG):
        return None
    (bot_len,) = struct.unpack_from("<I", pixel_data, 4)
    pos = 8 + bot_len
    if len(pixel_data) < pos + 8 or pixel_data[pos : pos + 4] != ITEM_TAG:
        return None
    (frag_len,) = struct.unpack_from("<I", pixel_data, pos + 4)
    return pixel_data[pos + 8 : pos + 8 + min(frag_len, 1 << 16)]


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SOF segment of a JPEG / JPEG-LS stream."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in SOF_MARKERS:
            if pos + 9 > len(data):
                return None
            rows, cols = struct.unpack_from(">HH", data, pos + 5)
            return (rows, cols) if rows else None  # rows 0: defined later by DNL
        if marker == 0xDA:  # start of scan before any SOF
            return None
        pos += 2 + length
    return None


def j2k_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SIZ segment of a JPEG 2000 codestream (raw or in JP2)."""
    at = data.find(J2K_SOC_SIZ, 0, 4096)
    if at < 0 or at + 24 > len(data):
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, at + 8)
    return ysiz - yo, xsiz - xo


@dataclass(frozen=True)
class J2kCoding:
    """What a JPEG 2000 codestream's main header says about decoding it at reduced resolution."""

    components: int
    precision: int  # bits of the first component
    signed: bool
    levels: int  # wavelet decomposition levels (COD): resolutions 1/2 ... 1/2**levels exist


def j2k_coding(data: bytes) -> J2kCoding | None:
    """SIZ and COD of a JPEG 2000 main header (raw codestream or in JP2), or None."""
    at = data.find(J2K_SOC_SIZ, 0, 4096)
    if at < 0 or at + 43 > len(data):
        return None
    (lsiz,) = struct.unpack_from(">H", data, at + 4)
    (components,) = struct.unpack_from(">H", data, at + 40)
    ssiz = data[at + 42]
    pos = at + 4 + lsiz  # the marker segments after SIZ, up to the first tile (SOT)
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0x90:
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if data[pos + 1] == 0x52 and pos + 13 <= len(data):  # COD: Scod, SGcod (4), SPcod[0] = levels
            return J2kCoding(components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), data[pos + 9])
        pos += 2 + length
    return None


def codestream_size(pixel_data: bytes) -> tuple[int, int] | None:
    """Declared (rows, columns) of the first frame, or None where the format has none (RLE)."""
    frag = first_fragment(pixel_data)
    if frag is None:
        return None
    return jpeg_size(frag) or j2k_size(frag)
