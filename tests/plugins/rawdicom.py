"""A DICOM upper-layer client built by hand, for sending what no well-behaved library would.

The hostile-peer tests and the fuzzer need byte-level control: PDUs that lie about their
length, command sets without a Command Field, UIDs with a newline, datasets cut or deflated
into bombs, A-ASSOCIATE-RQs dribbled one byte at a time.  Everything here is plain bytes over
a socket (PS3.8 section 9.3 for the PDUs, PS3.7 annex E for command sets).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"

C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030


def _item(item_type: int, data: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(data)) + data


def _pad_uid(uid: str | bytes) -> bytes:
    raw = uid.encode() if isinstance(uid, str) else uid
    return raw + b"\x00" if len(raw) % 2 else raw


def associate_rq(
    contexts: list[tuple[str, list[str]]], calling: str = "RAWSCU", called: str = "XRAY_TRIAGE", max_pdu: int = 0
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing `contexts` (abstract syntax, transfer syntaxes) with IDs 1, 3, 5..."""
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for i, (abstract, syntaxes) in enumerate(contexts):
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", 2 * i + 1, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode())
    body += _item(0x50, user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def element(tag: int, value: bytes, vr: str = "") -> bytes:
    """An implicit VR little endian element (command sets are always encoded so); odd values are padded."""
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def command(elements: dict[int, bytes], group_length: bool = True) -> bytes:
    """A command set from {tag: encoded value}; UI values are given unpadded (padded here)."""
    body = b"".join(
        element(tag, value, "UI" if tag in (0x00000002, 0x00001000) else "") for tag, value in sorted(elements.items())
    )
    return (element(0x00000000, struct.pack("<L", len(body))) if group_length else b"") + body


def store_command(sop_class: str | bytes, sop_instance: str | bytes, message_id: int = 1) -> dict[int, bytes]:
    """The elements of a C-STORE-RQ (PS3.7 9.3.1.1); callers delete or replace entries to make it hostile."""
    return {
        0x00000002: sop_class.encode() if isinstance(sop_class, str) else sop_class,
        0x00000100: us(C_STORE_RQ),
        0x00000110: us(message_id),
        0x00000700: us(0),
        0x00000800: us(0x0000),
        0x00001000: sop_instance.encode() if isinstance(sop_instance, str) else sop_instance,
    }


def echo_command(message_id: int = 1) -> dict[int, bytes]:
    return {0x00000002: VERIFICATION.encode(), 0x00000100: us(C_ECHO_RQ), 0x00000110: us(message_id),
            0x00000800: us(0x0101)}  # fmt: skip


def p_data(context_id: int, payload: bytes, *, is_command: bool, last: bool) -> bytes:
    header = (1 if is_command else 0) | (2 if last else 0)
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, header) + payload
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


@dataclass
class Reply:
    """What came back: a DIMSE response's status, or how the association ended."""

    kind: str  # "status", "abort", "closed", "reject", "timeout", "other"
    status: int | None = None
    comment: str = ""
    elements: dict[int, bytes] = field(default_factory=dict)


def parse_command(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack("<HHL", data[pos : pos + 8])
        out[(group << 16) | elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


class RawAssociation:
    """One connection to the listener, driven PDU by PDU."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.accepted: dict[int, str] = {}  # context ID -> transfer syntax
        self.peer_max_pdu = 16384

    def send(self, data: bytes) -> bool:
        """False when the listener has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _recv_exactly(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def read_pdu(self) -> tuple[int, bytes] | None:
        head = self._recv_exactly(6)
        if head is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", head)
        body = self._recv_exactly(length)
        return None if body is None else (pdu_type, body)

    def associate(self, contexts: list[tuple[str, list[str]]], **kwargs: object) -> bool:
        """Send an A-ASSOCIATE-RQ; True when accepted (accepted contexts in `self.accepted`)."""
        self.send(associate_rq(contexts, **kwargs))  # type: ignore[arg-type]
        pdu = self.read_pdu()
        if pdu is None or pdu[0] != 0x02:
            return False
        body, pos = pdu[1], 68
        while pos + 4 <= len(body):
            item_type, _, length = struct.unpack(">BBH", body[pos : pos + 4])
            data = body[pos + 4 : pos + 4 + length]
            if item_type == 0x21 and data[2] == 0:
                ts = data[4 + 4 : 4 + 4 + struct.unpack(">H", data[6:8])[0]]
                self.accepted[data[0]] = ts.decode().rstrip("\x00")
            if item_type == 0x50:
                sub = 0
                while sub + 4 <= len(data):
                    s_type, _, s_len = struct.unpack(">BBH", data[sub : sub + 4])
                    if s_type == 0x51:
                        self.peer_max_pdu = struct.unpack(">L", data[sub + 4 : sub + 8])[0] or 1 << 30
                    sub += 4 + s_len
            pos += 4 + length
        return True

    def send_message(self, context_id: int, cmd: bytes, dataset: bytes | None = None) -> bool:
        """A command and its dataset in PDUs no longer than the listener accepts."""
        ok = self.send(p_data(context_id, cmd, is_command=True, last=True))
        if dataset is None:
            return ok
        step = max(self.peer_max_pdu - 6, 1024)
        pieces = [dataset[i : i + step] for i in range(0, len(dataset), step)] or [b""]
        for i, piece in enumerate(pieces):
            ok = ok and self.send(p_data(context_id, piece, is_command=False, last=i == len(pieces) - 1))
        return ok

    def reply(self, timeout: float = 30.0) -> Reply:
        """The next DIMSE response, or how the association ended instead."""
        self.sock.settimeout(timeout)
        try:
            pdu = self.read_pdu()
        except TimeoutError:
            return Reply("timeout")
        if pdu is None:
            return Reply("closed")
        pdu_type, body = pdu
        if pdu_type == 0x07:
            return Reply("abort")
        if pdu_type == 0x03:
            return Reply("reject")
        if pdu_type != 0x04:
            return Reply("other")
        payload, pos = b"", 0
        while pos + 6 <= len(body):
            length, _ctx, _hdr = struct.unpack(">LBB", body[pos : pos + 6])
            payload += body[pos + 6 : pos + 4 + length]
            pos += 4 + length
        elements = parse_command(payload)
        status = elements.get(0x00000900)
        comment = elements.get(0x00000902, b"").decode("ascii", "replace").strip()
        return Reply("status", struct.unpack("<H", status)[0] if status else None, comment, elements)

    def release(self) -> None:
        self.send(struct.pack(">BBL", 0x05, 0, 4) + b"\x00" * 4)
        try:
            self.sock.settimeout(5)
            self.read_pdu()
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def closed_by_peer(sock: socket.socket, wait_s: float) -> bool:
    """Whether the other side closed `sock` within `wait_s` (reads and discards anything it sent)."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False
