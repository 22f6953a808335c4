"""DIMSE command sets checked before pynetdicom dispatches them, so every malformed command gets an answer.

pynetdicom decodes a command set in its network (DUL) thread and builds the request from it:
an empty, blank or over-long UID raised there and aborted the association, and a command
without Command Field or Affected SOP Class UID killed the reader thread itself (a traceback
per message, the sender left waiting).  A C-ECHO carrying a dataset would have been buffered
in memory without bound.  Here the command set is checked when its last fragment arrives,
*before* pynetdicom sees it:

* a C-STORE-RQ with a missing or invalid Affected SOP Class/Instance UID is answered 0xC212,
  one without a dataset 0xC210, one on a presentation context of another SOP class 0x0122;
* a C-ECHO-RQ with a bad SOP class or a dataset is answered 0x0212 (mistyped argument);
* any other request is answered 0x0211 (unrecognised operation): this AE serves only these two;
* a command that cannot be answered at all (undecodable, no Command Field or Message ID, no
  Command Data Set Type, an unaccepted presentation context, a response nobody asked for)
  ends the association with an A-ABORT and one log line.

The dataset fragments of a refused message are read and dropped, never stored or buffered.
Like ``dicom_io.staging`` this replaces one pynetdicom method, for registered AEs only.
"""

from __future__ import annotations

import logging
import struct
import threading
import weakref
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

from dicom_io.uids import uid_text

log = logging.getLogger("xray_triage.listener")

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
RESPONSE_BIT = 0x8000
# A real command set is a few hundred bytes; one that keeps growing is not one.
COMMAND_LIMIT = 64 * 1024

MALFORMED_DATASET = 0xC210
INVALID_UID = 0xC212
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNIZED_OPERATION = 0x0211
MISTYPED_ARGUMENT = 0x0212

_AFFECTED_SOP_CLASS = Tag(0x0000, 0x0002)
_COMMAND_FIELD = Tag(0x0000, 0x0100)
_MESSAGE_ID = Tag(0x0000, 0x0110)
_DATASET_TYPE = Tag(0x0000, 0x0800)
_AFFECTED_SOP_INSTANCE = Tag(0x0000, 0x1000)

_guarded: weakref.WeakSet[Any] = weakref.WeakSet()
_install_lock = threading.Lock()
_original_receive = DIMSEServiceProvider.receive_primitive


@dataclass(frozen=True)
class Verdict:
    """What to do with a command: pass it to pynetdicom, answer it ourselves, or abort."""

    ok: bool
    reason: str = ""
    # For a refused command: the response to send; None means it cannot be answered (abort).
    reply: bytes | None = None
    # Dataset fragments follow the command (to be dropped when it is refused).
    dataset_follows: bool = False


def _abort_verdict(reason: str) -> Verdict:
    return Verdict(False, reason)


def _element(tag: int, vr: str, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def response_command(
    command_field: int, message_id: int, status: int, comment: str, sop_class: str | None = None
) -> bytes:
    """An encoded response command set (implicit VR little endian, PS3.7 E.1) with an Error Comment."""
    body = b""
    if sop_class:
        body += _element(0x00000002, "UI", sop_class.encode())
    body += _element(0x00000100, "US", struct.pack("<H", command_field | RESPONSE_BIT))
    body += _element(0x00000120, "US", struct.pack("<H", message_id & 0xFFFF))
    body += _element(0x00000800, "US", struct.pack("<H", NO_DATASET))
    body += _element(0x00000900, "US", struct.pack("<H", status))
    body += _element(0x00000902, "LO", comment[:64].encode("ascii", "replace"))
    return _element(0x00000000, "UL", struct.pack("<L", len(body))) + body


def p_data_tf(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying a whole command set in one PDV (last command fragment)."""
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def _us(ds: Dataset, tag: Any) -> int | None:
    elem = ds.get_item(tag)
    if elem is None:
        return None
    raw = elem.value if isinstance(elem, RawDataElement) else None
    if raw is not None:
        return struct.unpack("<H", raw)[0] if isinstance(raw, bytes) and len(raw) == 2 else None
    return elem.value if isinstance(elem.value, int) else None


def _uid(ds: Dataset, tag: Any) -> str | None:
    """The UID as sent (only its NUL/space padding removed), or None when absent or not a valid UID."""
    elem = ds.get_item(tag)
    return None if elem is None else uid_text(elem)


def check_command(raw: bytes, context_id: int, accepted: dict[int, Any]) -> Verdict:
    """Whether the command may go to pynetdicom; else what to answer (or that it cannot be answered)."""
    try:
        cs = decode(BytesIO(raw), True, True)
        field = _us(cs, _COMMAND_FIELD)
        message_id = _us(cs, _MESSAGE_ID)
        dataset_type = _us(cs, _DATASET_TYPE)
    except Exception:  # noqa: BLE001 - pydicom raises many types on garbage; all mean "cannot decode"
        return _abort_verdict("the command set cannot be decoded")
    if field is None:
        return _abort_verdict("the command has no Command Field")
    if message_id is None:
        return _abort_verdict("the command has no Message ID")
    if dataset_type is None:
        return _abort_verdict("the command has no Command Data Set Type")
    if context_id not in accepted:
        return _abort_verdict(f"the command uses presentation context {context_id}, which was not accepted")
    has_dataset = dataset_type != NO_DATASET
    if field & RESPONSE_BIT:
        return _abort_verdict(f"a response (Command Field 0x{field:04X}) that answers nothing")
    sop_class = _uid(cs, _AFFECTED_SOP_CLASS)
    context_class = str(accepted[context_id].abstract_syntax)

    def refuse(status: int, reason: str) -> Verdict:
        return Verdict(False, reason, response_command(field, message_id, status, reason, sop_class), has_dataset)

    accept = Verdict(True, dataset_follows=has_dataset)

    if field == C_STORE_RQ:
        if sop_class is None:
            return refuse(INVALID_UID, "Affected SOP Class UID missing or not a valid UID")
        if _uid(cs, _AFFECTED_SOP_INSTANCE) is None:
            return refuse(INVALID_UID, "Affected SOP Instance UID missing or not a valid UID")
        if not has_dataset:
            return refuse(MALFORMED_DATASET, "C-STORE request without a dataset")
        if sop_class != context_class:
            return refuse(SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context's")
        return accept
    if field == C_ECHO_RQ:
        if sop_class is None or has_dataset:
            return refuse(MISTYPED_ARGUMENT, "C-ECHO request with a bad SOP class or a dataset")
        if sop_class != context_class:
            return refuse(SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context's")
        return accept
    if field == C_CANCEL_RQ and not has_dataset:
        return accept
    return refuse(UNRECOGNIZED_OPERATION, f"operation 0x{field:04X} is not served here")


def _single(context_id: int, data: bytes) -> P_DATA:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, data]]  # type: ignore[list-item]  # as pynetdicom checks it
    return primitive


def _guarded_receive(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
    """receive_primitive, one PDV at a time, with each command set checked before pynetdicom decodes it."""
    assoc = self.assoc
    if assoc.ae not in _guarded:
        _original_receive(self, primitive)
        return
    state = self.__dict__.setdefault("_xt_state", _State())
    for context_id, data in primitive.presentation_data_value_list:
        header = data[0] if data else 0
        if not header & 1:  # a dataset fragment
            if not state.in_dataset:
                _abort(self, "a dataset fragment without a command before it")
                return
            if header & 2:
                state.in_dataset = False
            if state.dropping:
                state.dropping = not header & 2
                continue
        elif state.in_dataset:
            _abort(self, "a command arrived inside the dataset of an earlier message")
            return
        elif not header & 2:
            state.command_bytes += len(data) - 1
            if state.command_bytes > COMMAND_LIMIT:
                _abort(self, f"a command set longer than {COMMAND_LIMIT} bytes")
                return
        else:
            state.command_bytes = 0
            prior = self.message.encoded_command_set.getvalue() if self.message is not None else b""
            verdict = check_command(prior + bytes(data[1:]), context_id, assoc._accepted_cx)
            if not verdict.ok and verdict.reply is None:
                _abort(self, verdict.reason)
                return
            state.in_dataset = verdict.dataset_follows
            if not verdict.ok:
                self.message = None
                log.warning("DIMSE request from %s refused: %s", _peer(assoc), verdict.reason)
                sock = assoc.dul.socket
                if sock is not None:
                    sock.send(p_data_tf(context_id, verdict.reply or b""))
                state.dropping = state.in_dataset
                continue
        _original_receive(self, _single(context_id, data))


@dataclass
class _State:
    """Where one association's message stream is: inside a dataset, dropping one, command bytes so far."""

    in_dataset: bool = False
    dropping: bool = False
    command_bytes: int = 0


def _peer(assoc: Any) -> str:
    primitive = getattr(assoc.requestor, "primitive", None)
    title = str(getattr(primitive, "calling_ae_title", "") or "").strip()
    return f"{title}@{assoc.requestor.address}"


def _abort(provider: DIMSEServiceProvider, reason: str) -> None:
    log.warning("association from %s aborted: %s", _peer(provider.assoc), reason)
    provider.message = None
    provider.assoc.abort(block=False)


def install(ae: Any) -> None:
    """Check the command sets of associations accepted by `ae` (idempotent)."""
    with _install_lock:
        DIMSEServiceProvider.receive_primitive = _guarded_receive  # type: ignore[method-assign]
        _guarded.add(ae)
