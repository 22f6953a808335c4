"""Send one HL7 message over MLLP and read its acknowledgement, every step under a deadline.

python-hl7's asyncio MLLP streams do the framing (<VT> message <FS><CR>); ``asyncio.wait_for``
bounds the whole exchange, so a receiver that accepts the connection and never answers costs
one timeout, not a stuck worker.  Only an ACK whose MSA-1 is AA or CA, for our control id,
counts as delivered.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import hl7
from hl7.mllp import open_hl7_connection

ACCEPTED = frozenset({"AA", "CA"})


class Hl7SendError(Exception):
    """The message was not accepted; the text says why (connection, timeout or the NAK's code and text)."""


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2: the control id it acknowledges
    text: str  # MSA-3 and ERR, if any


def read_ack(message: hl7.Message) -> Ack:
    try:
        msa = message.segment("MSA")
    except KeyError:
        raise Hl7SendError("the answer holds no MSA segment") from None
    text = str(msa(3)) if len(msa) > 3 else ""
    try:
        err = message.segment("ERR")
        text = f"{text} {err}".strip()
    except KeyError:
        pass
    return Ack(str(msa(1)), str(msa(2)), message.unescape(text))


async def _exchange(host: str, port: int, text: str) -> hl7.Message:
    reader, writer = await open_hl7_connection(host, port, encoding="utf-8")
    try:
        writer.writemessage(text)
        await writer.drain()
        return await reader.readmessage()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def send_message(host: str, port: int, text: str, control_id: str, timeout_s: float) -> Ack:
    """Deliver `text`; return the ACK when accepted, else raise Hl7SendError with the reason."""
    try:
        answer = asyncio.run(asyncio.wait_for(_exchange(host, port, text), timeout_s))
    except TimeoutError:
        raise Hl7SendError(f"no acknowledgement from {host}:{port} within {timeout_s:g} s") from None
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        raise Hl7SendError(f"MLLP exchange with {host}:{port} failed: {type(exc).__name__}: {exc}") from None
    ack = read_ack(answer)
    if ack.control_id != control_id:
        raise Hl7SendError(f"acknowledgement for control id {ack.control_id!r}, expected {control_id!r}")
    if ack.code not in ACCEPTED:
        raise Hl7SendError(f"receiver answered {ack.code}" + (f": {ack.text}" if ack.text else ""))
    return ack
