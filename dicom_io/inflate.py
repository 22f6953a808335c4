"""Deflated Explicit VR Little Endian, inflated as a stream under a byte budget.

pydicom inflates a deflated dataset with one ``zlib.decompress`` of the whole file, so 1.5 MB
on the wire became 1.5 GB in memory (a deflate bomb), and a cut or bit-flipped stream
inflated to *something* that read as a dataset.  Here the stream is inflated chunk by chunk
into a file or buffer, and it must:

* end as a deflate stream ends (a truncated transfer never does), followed by at most the
  one pad byte PS3.5 A.5 allows;
* stay within a budget derived from what the dataset itself declares: the header (everything
  before Pixel Data) is at most ``HEADER_LIMIT`` bytes; once Rows, Columns, Bits Allocated,
  Samples per Pixel and Number of Frames are known, the rest may be the declared pixel bytes
  plus ``TRAILER_ALLOWANCE`` and no more; the declared pixel bytes must be within the
  configured ``pixels.max_pixel_bytes``.

The inflated bytes are then an Explicit VR Little Endian dataset that gets the same
completeness check as every other transfer syntax.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

CHUNK_IN = 256 * 1024
CHUNK_OUT = 1024 * 1024
HEADER_LIMIT = 16 * 1024 * 1024
TRAILER_ALLOWANCE = 1024 * 1024
PIXEL_DATA = Tag(0x7FE0, 0x0010)
HEAD_PEEK = 4096


class InflateError(ValueError):
    """The deflated bytes are not one complete deflate stream within its budget."""


def _declared_pixel_bytes(head: BinaryIO) -> tuple[int, int] | None:
    """(offset of Pixel Data, declared pixel bytes) from an inflated prefix, or None if not in it yet."""
    head.seek(0)
    try:
        ds = read_dataset(head, is_implicit_VR=False, is_little_endian=True, stop_when=lambda t, *_: t == PIXEL_DATA)
    except Exception:  # noqa: BLE001  # a prefix may end inside an element; the caller inflates more or gives up
        return None
    offset = head.tell()
    head.seek(offset)
    if head.read(4) != b"\xe0\x7f\x10\x00":
        return None

    def number(keyword: str, default: int) -> int:
        try:
            value = ds.get(keyword)
            return default if value in (None, "") else int(value)
        except (TypeError, ValueError) as exc:
            raise InflateError(f"{keyword} is not a number") from exc

    rows, cols = number("Rows", 0), number("Columns", 0)
    samples, bits, frames = number("SamplesPerPixel", 1), number("BitsAllocated", 0), number("NumberOfFrames", 1)
    if min(rows, cols, samples, bits, frames) < 1:
        raise InflateError("the Image Pixel module does not declare a pixel size")
    total_bits = rows * cols * samples * bits * frames
    return offset, (total_bits + 7) // 8 + 1  # +1: an odd length is padded to even


class _Inflater:
    def __init__(self, src: BinaryIO, dst: BinaryIO) -> None:
        self.src = src
        self.dst = dst
        self.z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.pending = b""
        self.written = 0

    def run(self, budget: int) -> bool:
        """Inflate until the stream ends (True) or `budget` bytes are written (False)."""
        while not self.z.eof:
            if not self.pending:
                self.pending = self.src.read(CHUNK_IN)
                if not self.pending:
                    raise InflateError("the deflate stream is cut short (the transfer is incomplete)")
            room = budget - self.written
            if room <= 0:
                return False
            try:
                out = self.z.decompress(self.pending, min(CHUNK_OUT, room))
            except zlib.error as exc:
                raise InflateError(f"the deflate stream is corrupt: {exc}") from None
            self.pending = self.z.unconsumed_tail
            self.dst.write(out)
            self.written += len(out)
        rest = self.z.unused_data + self.src.read(2)
        if len(rest) > 1 or rest.strip(b"\x00"):
            raise InflateError("bytes follow the end of the deflate stream")
        return True


def inflate(src: BinaryIO, dst: BinaryIO, max_pixel_bytes: int) -> int:
    """Inflate the raw deflate stream read from `src` into `dst` (readable, seekable); returns the byte count.

    Raises InflateError for a cut, corrupt or over-long stream; `dst` then holds a prefix only.
    """
    job = _Inflater(src, dst)
    ended = job.run(HEADER_LIMIT)
    dst.seek(0)
    declared = _declared_pixel_bytes(dst)
    dst.seek(0, io.SEEK_END)
    if declared is None:
        if ended:
            return job.written  # no Pixel Data: whole and small; the caller decides what that means
        raise InflateError(f"no Pixel Data within the first {HEADER_LIMIT} inflated bytes")
    offset, pixel_bytes = declared
    if pixel_bytes > max_pixel_bytes + 1:
        declared_bytes = pixel_bytes - 1
        raise InflateError(f"the dataset declares {declared_bytes} bytes of pixels; at most {max_pixel_bytes} accepted")
    budget = offset + 12 + pixel_bytes + TRAILER_ALLOWANCE
    if job.written > budget or not (ended or job.run(budget)):
        raise InflateError("the deflate stream inflates past the size its header declares")
    return job.written


def inflate_bytes(deflated: bytes, max_pixel_bytes: int) -> bytes:
    """`inflate` for data already in memory (uploads, the pixel path)."""
    out = io.BytesIO()
    inflate(io.BytesIO(deflated), out, max_pixel_bytes)
    return out.getvalue()


def is_deflated_part10(head: bytes) -> bool:
    """Whether a Part-10 file's meta (its first bytes, up to about 1 KiB) names Deflated Explicit VR LE."""
    if len(head) < 144 or head[128:132] != b"DICM":
        return False
    try:
        meta = read_dataset(io.BytesIO(head[132:]), False, True, stop_when=lambda t, *_: t.group != 2)
        return str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001  # a meta cut by the peek or broken: let the ordinary reader report it
        return False


def read_deflated(fp: BinaryIO, max_pixel_bytes: int, name: str = "") -> FileDataset:
    """A deflated Part-10 file as pydicom would read it, inflated under the budget (InflateError if not)."""
    preamble = fp.read(128)
    if fp.read(4) != b"DICM":
        raise InflateError("not a Part-10 file")
    meta = read_dataset(fp, False, True, stop_when=lambda t, *_: t.group != 2)
    inflated = io.BytesIO()
    inflate(fp, inflated, max_pixel_bytes)
    inflated.seek(0)
    ds = read_dataset(inflated, False, True)
    return FileDataset(name, ds, preamble=preamble, file_meta=FileMetaDataset(meta), is_implicit_VR=False,
                       is_little_endian=True)  # fmt: skip


def dcmread_bounded(source: Path | bytes, *, force: bool, max_pixel_bytes: int) -> Dataset:
    """``pydicom.dcmread``, except that a deflated file is inflated under a budget instead of in one go."""
    with source.open("rb") if isinstance(source, Path) else io.BytesIO(source) as fp:
        if is_deflated_part10(fp.read(HEAD_PEEK)):
            fp.seek(0)
            return read_deflated(fp, max_pixel_bytes, str(source) if isinstance(source, Path) else "")
        fp.seek(0)
        return dcmread(fp, force=force)
