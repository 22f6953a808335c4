"""Stream each incoming C-STORE dataset straight into the spool, hashing it on the way in.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes every received dataset, behind a file
meta header, to a ``NamedTemporaryFile`` in the system temp folder; the handler would then
have to read it back, hash it and copy it into the spool: the same 10-50 MB touched three
more times while the modality waits for its status.  Here pynetdicom's temporary file is
replaced by one created *inside the spool's staging folder* that updates a SHA-256 as the
fragments arrive, and its file meta carries our own implementation UID.  When the last
fragment is in, the file already is the final Part-10 file: the handler only fsyncs it and
links it under its final name.

pynetdicom offers no hook for this, so two names in ``pynetdicom.dimse_messages`` are
replaced (pinned to pynetdicom 3.x in setup.cfg).  The replacement falls back to the original
behaviour for associations of any AE not registered here, and the listener falls back to the
copy path for any file that is not a StagingFile, so a pynetdicom change degrades speed, not
correctness.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import queue
import struct
import sys
import tempfile
import threading
import time
import types
import weakref
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import dimse_messages
from pynetdicom.dsutils import create_file_meta as _pynetdicom_create_file_meta
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP, A_RELEASE_RQ

# Our own Implementation Class UID (a UUID-derived 2.25 root, PS3.5 B.2) and version name.
# Stored files carry these instead of the library defaults, so the bytes we write (and their
# SHA-256) do not change when pydicom or pynetdicom is upgraded.
IMPLEMENTATION_CLASS_UID = "2.25.168776540640831845681577209773524712428"
IMPLEMENTATION_VERSION_NAME = "XRAY_TRIAGE_1"

STAGING_SUFFIX = ".part"
# Start writing to disk every this many bytes while the transfer is still running, so the
# fsync the modality waits for at the end only has the tail left to write.
EARLY_WRITEBACK_BYTES = 2 * 1024 * 1024
# Received fragments waiting for the writer thread (a fragment is at most one PDU).
QUEUE_FRAGMENTS = 256
OWNER_CHECK_S = 2.0

_create_file_meta = partial(
    _pynetdicom_create_file_meta,
    implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
    implementation_version=IMPLEMENTATION_VERSION_NAME,
)
_original_named_temporary_file = dimse_messages.NamedTemporaryFile
_staging_dirs: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()
_install_lock = threading.Lock()


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, 'DICM' and File Meta Information exactly as a StagingFile receives them.

    Deterministic (no time, no calling AE), so the same dataset always yields the same file
    and the file's SHA-256 identifies its content.
    """
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(
        DicomFileLike(buf),
        _create_file_meta(
            sop_class_uid=UID(sop_class_uid),
            sop_instance_uid=UID(sop_instance_uid),
            transfer_syntax=UID(transfer_syntax_uid),
        ),
    )
    return buf.getvalue()


def _load_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_sync_file_range = _load_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask Linux to start writing a byte range to disk without waiting (sync_file_range(2)).

    Not a durability guarantee (the final fsync is); it only spreads the disk writes over
    the transfer.  A no-op where the call is unavailable.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class _NoFlush:
    """pynetdicom calls ``file.flush()`` after every fragment; the writer thread writes unbuffered."""

    def flush(self) -> None:
        return None


class StagingFile:
    """The part of NamedTemporaryFile pynetdicom uses (write, file.flush, name, close), written and hashed off-thread.

    pynetdicom calls `write` from the association's network thread for every received
    fragment.  Hashing and writing there would stall reading the socket (a 10 MB image costs
    about 15 ms of SHA-256 alone), so fragments are handed to a writer thread that hashes,
    writes and starts write-back on the other CPU while the network thread reads on.
    `finish` waits for the writer; the listener calls it before touching the file.
    """

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(dir=folder, suffix=STAGING_SUFFIX)
        self.name = name
        self.file = _NoFlush()
        self._fio = os.fdopen(fd, "wb", buffering=0)
        self._sha = hashlib.sha256()
        self.size = 0
        self._written_back = 0
        self._error: OSError | None = None
        self._abandoned = False
        self._finished = False
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_FRAGMENTS)
        # The network thread that feeds us: if it dies mid-transfer (peer aborted), nobody
        # will ever call finish/close, so the writer cleans up by itself.
        self._owner = threading.current_thread()
        self._writer = threading.Thread(target=self._drain, name="xray-triage-staging", daemon=True)
        self._writer.start()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._queue.put(data if isinstance(data, bytes) else bytes(data))
        return len(data)

    def _store(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        view = memoryview(chunk)
        while view:
            written = self._fio.write(view) or 0
            view = view[written:]
        self.size += len(chunk)
        if self.size - self._written_back >= EARLY_WRITEBACK_BYTES:
            start_writeback(self._fio.fileno(), self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def _drain(self) -> None:
        while True:
            try:
                chunk = self._queue.get(timeout=OWNER_CHECK_S)
            except queue.Empty:
                if not self._owner.is_alive():
                    self._abandon()
                    return
                continue
            if chunk is None:
                return
            if self._error is None:
                try:
                    self._store(chunk)
                except OSError as exc:  # e.g. disk full: reported by finish(), the sender gets a failure
                    self._error = exc

    def _abandon(self) -> None:
        self._abandoned = True
        self._fio.close()
        Path(self.name).unlink(missing_ok=True)

    def finish(self) -> None:
        """Wait until every received byte is in the file; raise the writer's OSError if it had one."""
        if not self._finished:
            self._queue.put(None)
            self._writer.join()
            self._finished = True
        if self._abandoned:
            raise OSError("transfer abandoned: the association ended before the dataset was complete")
        if self._error is not None:
            raise self._error

    def sha256(self) -> str:
        self.finish()
        return self._sha.hexdigest()

    def fsync(self) -> None:
        self.finish()
        os.fsync(self._fio.fileno())

    def close(self) -> None:
        try:
            self.finish()
        except OSError:
            pass
        if not self._fio.closed:
            self._fio.close()


def _named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile call, redirected for associations of registered AEs."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    folder = _staging_dirs.get(getattr(assoc, "ae", None)) if assoc is not None else None
    if folder is None:
        return _original_named_temporary_file(*args, **kwargs)
    return StagingFile(folder)


def install(ae: Any, staging_dir: Path) -> None:
    """Make datasets received by `ae` stream into `staging_dir` (idempotent)."""
    with _install_lock:
        dimse_messages.NamedTemporaryFile = _named_temporary_file
        dimse_messages.create_file_meta = _create_file_meta
        _staging_dirs[ae] = Path(staging_dir)


def staged_file(request: Any) -> StagingFile | None:
    """The StagingFile behind a C-STORE request, or None when pynetdicom used its own temp file."""
    candidate = getattr(request, "_dataset_file", None)
    return candidate if isinstance(candidate, StagingFile) else None


P_DATA_TF = 0x04
_CONTROL_PDUS: dict[int, Any] = {
    0x01: A_ASSOCIATE_RQ,
    0x02: A_ASSOCIATE_AC,
    0x03: A_ASSOCIATE_RJ,
    0x05: A_RELEASE_RQ,
    0x06: A_RELEASE_RP,
    0x07: A_ABORT_RQ,
}
# A-ASSOCIATE, A-RELEASE and A-ABORT PDUs are a few bytes to some tens of KiB (128 presentation
# contexts with full UIDs); nothing real comes near this.
CONTROL_PDU_LIMIT = 1 << 20
# With listener.max_pdu 0 (no limit, as PS3.8 allows) a P-DATA-TF is still bounded by this.
UNLIMITED_PDU_LIMIT = 64 << 20
# A PDU larger than this is read into memory as its bytes arrive, not allocated up front.
RECV_CHUNK = 1 << 20


class PduTooLong(OSError):
    """The peer declared a PDU longer than this listener accepts: a protocol violation.

    An OSError because that is what pynetdicom's reader treats as a closed transport: the
    association ends at once, without reading (or allocating) the declared length.
    """


def pdu_limit(pdu_type: int, max_pdu: int) -> int:
    """The longest PDU body accepted: ``listener.max_pdu`` (what we told the peer in the
    A-ASSOCIATE-AC) for P-DATA-TF, a fixed bound for the others."""
    if pdu_type == P_DATA_TF:
        return max_pdu if max_pdu > 0 else UNLIMITED_PDU_LIMIT
    return CONTROL_PDU_LIMIT


class DeadlineExceeded(TimeoutError):
    """The peer did not finish associating, or sending one PDU, in time (an OSError: the transport ends)."""


def _deadline(sock: Any, starting_pdu: bool) -> float:
    """When the current read must be done: the PDU's deadline, and the association's until it is established."""
    now = time.monotonic()
    if starting_pdu or sock._xt_pdu_by is None:
        sock._xt_pdu_by = now + sock._xt_message_s
    deadline: float = sock._xt_pdu_by
    if sock._xt_establish_by is not None:
        if getattr(sock.assoc, "is_established", False):
            sock._xt_establish_by = None
        else:
            deadline = min(deadline, sock._xt_establish_by)
    return deadline


def _recv_exactly(sock: Any, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv, bounded in size and time.

    pynetdicom reads a PDU as a 6-byte header (type, length), then ``recv(length)``.  Its own
    reader allocates nothing up front but reads 4 KiB at a time (some 2,500 Python-level reads
    for a 10 MB image), and a header declaring 4 GiB followed by 16 bytes made the earlier
    fast reader allocate 4 GiB at once; its socket timeout applies per read call, so a peer
    sending one byte every 15 s was never timed out.  Here the header is remembered, a body
    longer than ``pdu_limit`` ends the association, a body is read straight into its buffer
    (large ones chunk by chunk, as the bytes arrive), each PDU must arrive whole within the
    network timeout of its first byte, and until the association is established every read
    must end by the association deadline.  Otherwise the original's semantics: block until
    ``nr_bytes`` arrived, return what there is if the peer closed.
    """
    pending = sock._xt_pending
    sock._xt_pending = None
    if pending is not None and pending[1] == nr_bytes:
        limit = pdu_limit(pending[0], sock._xt_max_pdu)
        if nr_bytes > limit:
            raise PduTooLong(f"PDU type 0x{pending[0]:02X} declares {nr_bytes} bytes; at most {limit} accepted")
        body = _read(sock.socket, nr_bytes, _deadline(sock, starting_pdu=False))
        if pending[0] != P_DATA_TF and len(body) == nr_bytes:
            _check_control_pdu(pending[0], body)
        return body
    data = _read(sock.socket, nr_bytes, _deadline(sock, starting_pdu=nr_bytes == 6))
    if nr_bytes == 6 and len(data) == 6:
        sock._xt_pending = (data[0], int.from_bytes(data[2:6], "big"))
    return data


class MalformedPdu(OSError):
    """A control PDU that pynetdicom could decode but not act on (e.g. an A-ABORT with an invalid
    source): it would raise inside pynetdicom's state machine and kill the association's thread,
    so the connection is ended as if the peer had dropped it."""


def _check_control_pdu(pdu_type: int, body: bytes | bytearray) -> None:
    kind = _CONTROL_PDUS.get(pdu_type)
    if kind is None:
        return  # unknown types: pynetdicom answers them with an A-ABORT itself
    pdu = kind()
    try:
        pdu.decode(struct.pack(">BBL", pdu_type, 0, len(body)) + bytes(body))
        pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - any failure here is the peer's malformed PDU
        raise MalformedPdu(f"malformed PDU type 0x{pdu_type:02X}: {type(exc).__name__}: {exc}") from None


def _recv_into(raw: Any, view: memoryview, nr_bytes: int, deadline: float) -> int:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the peer is too slow: deadline passed before its data arrived")
    raw.settimeout(remaining)
    try:
        return int(raw.recv_into(view, nr_bytes))
    except TimeoutError:
        raise DeadlineExceeded("the peer is too slow: deadline passed before its data arrived") from None


def _read(raw: Any, nr_bytes: int, deadline: float) -> bytearray:
    timeout = raw.gettimeout()
    try:
        if nr_bytes <= RECV_CHUNK:
            buf = bytearray(nr_bytes)
            with memoryview(buf) as view:
                got = 0
                while got < nr_bytes:
                    n = _recv_into(raw, view[got:], nr_bytes - got, deadline)
                    if n == 0:
                        break
                    got += n
            return buf if got == nr_bytes else buf[:got]
        out = bytearray()
        scratch = bytearray(RECV_CHUNK)
        with memoryview(scratch) as view:
            while len(out) < nr_bytes:
                n = _recv_into(raw, view, min(RECV_CHUNK, nr_bytes - len(out)), deadline)
                if n == 0:
                    break
                out += view[:n]
        return out
    finally:
        raw.settimeout(timeout)


def tune_socket(assoc: Any, max_pdu: int, *, message_s: float, establish_s: float | None = None) -> None:
    """Give one association's socket the bounded read (instance attribute: nothing global changes).

    Called when the connection opens, so the A-ASSOCIATE-RQ itself is read under the
    association deadline `establish_s`; `message_s` bounds the arrival of each PDU.
    """
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    if sock is not None and getattr(sock, "socket", None) is not None and not getattr(sock, "_xt_tuned", False):
        sock._xt_max_pdu = max_pdu
        sock._xt_pending = None
        sock._xt_message_s = message_s
        sock._xt_pdu_by = None
        sock._xt_establish_by = None if establish_s is None else time.monotonic() + establish_s
        sock.recv = types.MethodType(_recv_exactly, sock)
        sock._xt_tuned = True
