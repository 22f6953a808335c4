"""Hostile and broken peers against the real listener, each a reproduction of an attack that once worked.

* Deflated data was acknowledged without the completeness check: a dataset cut by 20,000 bytes
  got 0x0000, and a 1.5 MB deflate bomb was inflated in memory (2.9 GiB) and acknowledged.
* Connections dribbling an A-ASSOCIATE-RQ one byte at a time kept every real sender out.
* Malformed C-STORE/C-ECHO command sets aborted the association or killed pynetdicom's reader
  thread instead of being answered; ``'1.2.3\\n'`` was accepted as a UID.

The listener runs in the test process, so its memory is this process's peak RSS.
"""

from __future__ import annotations

import random
import socket
import threading
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from db.models import Instance
from dicom_io.listener import open_associations
from tests.conftest import pydicom_data_file
from tests.plugins import rawdicom
from tests.plugins.ingest import echoscu, real_files, storescu, wait_for
from tests.plugins.netfuzz import complete
from tests.test_listener_bad_input import _count, _spooled_files
from tests.test_listener_hostile_pdus import MIB, _peak_rss, _peak_rss_reset

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
SUCCESS, MALFORMED, INVALID_UID = 0x0000, 0xC210, 0xC212


def _encode(ds: pydicom.Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _explicit_dataset(path: Path) -> tuple[pydicom.Dataset, bytes]:
    """A real radiograph's dataset (native pixels) encoded explicit VR little endian: what Deflated wraps."""
    ds = pydicom.dcmread(path)
    return ds, _encode(ds)


def _deflate(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = z.compress(data) + z.flush()
    return out + b"\x00" if len(out) % 2 else out


def _store(port: int, sop_class: str, ts: str, cmd: bytes, dataset: bytes | None) -> rawdicom.Reply:
    a = rawdicom.RawAssociation(port)
    assert a.associate([(sop_class, [ts])])
    assert a.send_message(1, cmd, dataset)
    reply = a.reply()
    a.release()
    return reply


@pytest.fixture
def listener(sqlite_backend, tmp_path, start_listener):
    settings = sqlite_backend.settings(tmp_path)
    return settings, start_listener(settings, with_handoff=False)


def test_deflated_cut_or_corrupt_is_never_acknowledged(listener):
    settings, handle = listener
    ds, data = _explicit_dataset(pydicom_data_file("RG1_UNCR.dcm"))
    cmd = rawdicom.command(rawdicom.store_command(ds.SOPClassUID, ds.SOPInstanceUID))
    whole = _deflate(data)
    cut = _deflate(data[:-20000])  # the structure is incomplete although the stream is whole
    assert _store(handle.port, ds.SOPClassUID, rawdicom.DEFLATED, cmd, cut).status == MALFORMED
    assert _store(handle.port, ds.SOPClassUID, rawdicom.DEFLATED, cmd, whole[:-20000]).status == MALFORMED
    rng = random.Random(12)
    refused = 0
    for _ in range(12):
        flipped = bytearray(whole)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        reply = _store(handle.port, ds.SOPClassUID, rawdicom.DEFLATED, cmd, bytes(flipped))
        assert reply.kind == "status" and reply.status is not None
        # Success only for a stream that inflates to a complete dataset (a flip inside literal pixel
        # bytes is undetectable, as in any syntax); a complete one may still be refused, e.g. for its UIDs.
        assert reply.status != SUCCESS or complete(bytes(flipped), rawdicom.DEFLATED), reply
        refused += reply.status != SUCCESS
    assert refused > 0  # the flips did reach the check
    assert _store(handle.port, ds.SOPClassUID, rawdicom.DEFLATED, cmd, whole).status == SUCCESS
    rows = _count(settings.database.url, Instance)
    assert rows == len(_spooled_files(Path(settings.storage.spool_dir))) >= 1


def _bomb(header: bytes, pixel_length: int) -> bytes:
    """A deflated dataset whose Pixel Data element is `pixel_length` zero bytes: about 1/1000 the size."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(header + b"\xe0\x7f\x10\x00OW\x00\x00" + pixel_length.to_bytes(4, "little"))]
    zeros = bytes(8 * MIB)
    for _ in range(pixel_length // len(zeros)):
        out.append(z.compress(zeros))
    out.append(z.compress(bytes(pixel_length % len(zeros))) + z.flush())
    data = b"".join(out)
    return data + b"\x00" if len(data) % 2 else data


@pytest.mark.parametrize("declared_rows", [512, 65535], ids=["small-image-huge-pixel-data", "huge-declared-image"])
def test_deflate_bomb_is_refused_without_inflating_it(listener, declared_rows):
    settings, handle = listener
    ds, _data = _explicit_dataset(pydicom_data_file("RG1_UNCR.dcm"))
    ds.Rows, ds.Columns = declared_rows, declared_rows
    del ds.PixelData
    bomb = _bomb(_encode(ds), 1024 * MIB)  # 1 GiB of pixels in about 1 MB
    assert len(bomb) < 2 * MIB
    cmd = rawdicom.command(rawdicom.store_command(ds.SOPClassUID, ds.SOPInstanceUID))
    _peak_rss_reset()
    before = _peak_rss()
    reply = _store(handle.port, ds.SOPClassUID, rawdicom.DEFLATED, cmd, bomb)
    grown = _peak_rss() - before
    assert reply.status == MALFORMED, reply
    assert "declares" in reply.comment or "past the size" in reply.comment
    assert grown <= 256 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB"
    assert _count(settings.database.url, Instance) == 0 and _spooled_files(Path(settings.storage.spool_dir)) == []
    staging = Path(settings.storage.spool_dir) / ".staging"
    assert not any(staging.glob("*")) if staging.exists() else True
    assert storescu(handle.port, [real_files()[0]]).returncode == 0


def _dribble(port: int, stop: threading.Event, closed: list[bool]) -> None:
    """Send a valid A-ASSOCIATE-RQ one byte at a time; record whether the listener closed us first."""
    rq = rawdicom.associate_rq([(rawdicom.VERIFICATION, [rawdicom.IMPLICIT_LE])])
    with socket.create_connection(("127.0.0.1", port)) as s:
        for byte in rq:
            if stop.wait(0.25):
                break
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed.append(True)
                return
            if rawdicom.closed_by_peer(s, 0.0):
                closed.append(True)
                return
        closed.append(rawdicom.closed_by_peer(s, 1.0))


def test_slow_and_garbage_connections_never_keep_a_real_sender_out(sqlite_backend, tmp_path, start_listener):
    """10 dribbling and a stream of junk connections, while DCMTK pushes: the push succeeds."""
    settings = sqlite_backend.settings(tmp_path, listener={"association_deadline_s": 3.0})
    handle = start_listener(settings, with_handoff=False)
    stop, closed = threading.Event(), []
    slow = [threading.Thread(target=_dribble, args=(handle.port, stop, closed)) for _ in range(10)]
    for t in slow:
        t.start()

    def junk() -> None:
        for _ in range(200):
            if stop.is_set():
                return
            with socket.create_connection(("127.0.0.1", handle.port)) as c:
                c.sendall(b"\0" * 50)
            stop.wait(0.05)

    junk_thread = threading.Thread(target=junk)
    junk_thread.start()
    try:
        for path in real_files()[:3]:
            result = storescu(handle.port, [path])
            assert result.returncode == 0, result.stderr[-2000:]
        assert echoscu(handle.port).returncode == 0
        # Each dribbler is cut off by the association deadline, long before its ~60 s request is complete.
        wait_for(lambda: len(closed) == 10, timeout=60, what="the listener to close every dribbling connection")
        assert all(closed)
    finally:
        stop.set()
        for t in [*slow, junk_thread]:
            t.join()
    wait_for(lambda: open_associations(handle.listener.ae) == 0, timeout=30, what="associations to end")


def _hostile_store(port: int, elements: dict[int, bytes], dataset: bytes | None) -> tuple[rawdicom.Reply, int | None]:
    """Send one hostile C-STORE, then a C-ECHO on the same association: (reply, echo status)."""
    a = rawdicom.RawAssociation(port)
    assert a.associate([(CR, [rawdicom.EXPLICIT_LE]), (rawdicom.VERIFICATION, [rawdicom.IMPLICIT_LE])])
    a.send_message(1, rawdicom.command(elements), dataset)
    reply = a.reply()
    echo = None
    if reply.kind == "status":
        a.send_message(3, rawdicom.command(rawdicom.echo_command(message_id=2)))
        echo = a.reply().status
    a.release()
    return reply, echo


def _real_cr() -> tuple[pydicom.Dataset, bytes]:
    return _explicit_dataset(pydicom_data_file("RG1_UNCR.dcm"))


@pytest.mark.parametrize(
    "instance_uid",
    [b"", b"  ", b"1." + b"2" * 70, b"1.2.3\n", b"1.2\x00.3"],
    ids=["empty", "blank", "over-64", "newline", "nul-inside"],
)
def test_bad_affected_sop_instance_uid_is_answered_c212(listener, log_text, instance_uid):
    settings, handle = listener
    _ds, data = _real_cr()
    elements = rawdicom.store_command(CR, instance_uid)
    reply, echo = _hostile_store(handle.port, elements, data)
    assert (reply.kind, reply.status) == ("status", INVALID_UID), reply
    assert "Affected SOP Instance UID" in reply.comment
    assert echo == SUCCESS  # the dataset was dropped and the association goes on
    assert _count(settings.database.url, Instance) == 0
    assert "Traceback" not in log_text()


@pytest.mark.parametrize(
    "change, expected",
    [
        pytest.param({0x00000002: None}, ("status", INVALID_UID), id="no-affected-sop-class"),
        pytest.param({0x00000002: b"1.2.840.10008.5.1.4.1.1.1\n"}, ("status", INVALID_UID), id="class-newline"),
        pytest.param({0x00000002: DX.encode()}, ("status", 0x0122), id="class-of-another-context"),
        pytest.param({0x00000800: rawdicom.us(0x0101)}, ("status", MALFORMED), id="store-without-dataset"),
        pytest.param({0x00000100: rawdicom.us(0x0020)}, ("status", 0x0211), id="c-find-not-served"),
        pytest.param({0x00000100: rawdicom.us(0x4242)}, ("status", 0x0211), id="unknown-command"),
        pytest.param({0x00000100: None}, ("abort", None), id="no-command-field"),
        pytest.param({0x00000110: None}, ("abort", None), id="no-message-id"),
        pytest.param({0x00000800: None}, ("abort", None), id="no-dataset-type"),
        pytest.param({0x00000100: rawdicom.us(0x8001)}, ("abort", None), id="unasked-response"),
        pytest.param({0x00000100: b"\x01\x00\x00\x00"}, ("abort", None), id="command-field-four-bytes"),
    ],
)
def test_malformed_commands_get_a_clear_answer(listener, log_text, change, expected):
    settings, handle = listener
    ds, data = _real_cr()
    elements = rawdicom.store_command(CR, ds.SOPInstanceUID)
    for tag, value in change.items():
        if value is None:
            del elements[tag]
        else:
            elements[tag] = value
    has_dataset = elements.get(0x00000800) != rawdicom.us(0x0101)
    reply, echo = _hostile_store(handle.port, elements, data if has_dataset else None)
    assert (reply.kind, reply.status) == expected, reply
    if reply.kind == "status":
        assert echo == SUCCESS
    assert "Traceback" not in log_text()
    assert _count(settings.database.url, Instance) == 0
    # The listener goes on serving real senders.
    assert storescu(handle.port, [real_files()[0]]).returncode == 0


def test_echo_with_a_dataset_is_answered_not_buffered(listener):
    _, handle = listener
    a = rawdicom.RawAssociation(handle.port)
    assert a.associate([(rawdicom.VERIFICATION, [rawdicom.IMPLICIT_LE])])
    elements = rawdicom.echo_command()
    elements[0x00000800] = rawdicom.us(0)
    a.send_message(1, rawdicom.command(elements), bytes(4 * MIB))
    assert a.reply().status == 0x0212
    a.send_message(1, rawdicom.command(rawdicom.echo_command(message_id=2)))
    assert a.reply().status == SUCCESS
    a.release()


def test_dataset_uid_with_a_newline_is_refused(listener):
    settings, handle = listener
    ds, _ = _real_cr()
    ds.StudyInstanceUID = "1.2.3"
    data = _encode(ds).replace(b"\x06\x001.2.3\x00", b"\x06\x001.2.3\n", 1)
    assert b"1.2.3\n" in data
    cmd = rawdicom.command(rawdicom.store_command(CR, ds.SOPInstanceUID))
    reply = _store(handle.port, CR, rawdicom.EXPLICIT_LE, cmd, data)
    assert reply.status == INVALID_UID, reply
    assert _count(settings.database.url, Instance) == 0


@pytest.mark.parametrize(
    "pdu",
    [
        bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 59, 0]),  # A-ABORT with an invalid source
        bytes([0x05, 0, 0, 0, 0, 2, 0, 0]),  # A-RELEASE-RQ shorter than its fixed 4 bytes
    ],
    ids=["abort-bad-source", "release-too-short"],
)
def test_malformed_control_pdus_end_the_connection_without_killing_a_thread(listener, log_text, pdu):
    _, handle = listener
    deaths: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: deaths.append(f"{args.exc_type.__name__}: {args.exc_value}")
    try:
        a = rawdicom.RawAssociation(handle.port)
        assert a.associate([(rawdicom.VERIFICATION, [rawdicom.IMPLICIT_LE])])
        a.send(pdu)
        assert rawdicom.closed_by_peer(a.sock, 30.0)
        a.close()
        wait_for(lambda: open_associations(handle.listener.ae) == 0, timeout=30, what="the association to end")
    finally:
        threading.excepthook = previous
    assert deaths == []
    assert "Traceback" not in log_text()
    assert echoscu(handle.port).returncode == 0
