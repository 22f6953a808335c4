"""The ORU^R01 priority message and its MLLP delivery, against a receiver on real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import hl7
import pytest

from hl7_io.mllp import Hl7SendError, send_message
from hl7_io.oru import FindingLine, PriorityMessage, build_oru, parse_oru
from models.findings import FINDINGS
from tests.conftest import free_port
from tests.plugins.mllp import MllpReceiver


def message(control_id: str = "XT7") -> PriorityMessage:
    lines = [
        FindingLine(
            f.name, f.display, (f.code.value, f.code.scheme_designator, f.code.meaning), 0.2 * (i + 1), 0.5, i == 2
        )
        for i, f in enumerate(FINDINGS)
    ]
    return PriorityMessage(
        control_id,
        datetime(2026, 12, 5, 12, tzinfo=UTC),
        "1.2.826.0.1.3680043.8.498.1",
        "ACC|7^x",  # separators in a value must not break the structure
        "PID-1",
        "Müller^Jürgen",
        "urgent",
        "covid19 0.60 ≥ 0.50 & more",
        "xray-triage-cnn@2026.12.01 (preprocessing xtpx-3)",
        lines,
    )


@pytest.fixture
def receiver() -> Iterator[MllpReceiver]:
    r = MllpReceiver()
    yield r
    r.close()


def test_message_reads_back_as_built() -> None:
    msg = message()
    text = build_oru(msg)
    parsed = parse_oru(text)
    assert (parsed.control_id, parsed.accession_number, parsed.study_uid) == ("XT7", "ACC|7^x", msg.study_uid)
    assert (parsed.priority, parsed.reason) == ("urgent", msg.reason)
    assert parsed.probabilities == {line.code[0]: pytest.approx(line.probability) for line in msg.findings}
    assert parsed.flagged == {line.code[0]: line.flagged for line in msg.findings}
    segments = [str(s[0]) for s in hl7.parse(text)]
    assert segments[:4] == ["MSH", "PID", "ORC", "OBR"] and set(segments[4:]) == {"OBX"}
    assert "not for diagnostic use" in text and "Müller" in text  # MSH-18 says UTF-8


def test_accepted_message_is_acknowledged(receiver: MllpReceiver) -> None:
    ack = send_message("127.0.0.1", receiver.port, build_oru(message()), "XT7", timeout_s=5)
    assert (ack.code, ack.control_id) == ("AA", "XT7")
    assert parse_oru(receiver.messages[-1]) == parse_oru(build_oru(message()))


@pytest.mark.parametrize("code", ["AE", "AR"])
def test_a_refusal_is_an_error_with_its_text(receiver: MllpReceiver, code: str) -> None:
    receiver.ack_code = code
    with pytest.raises(Hl7SendError, match=f"receiver answered {code}: test RIS refuses it"):
        send_message("127.0.0.1", receiver.port, build_oru(message()), "XT7", timeout_s=5)


def test_closed_port_is_an_error() -> None:
    with pytest.raises(Hl7SendError, match=r"MLLP exchange with 127\.0\.0\.1"):
        send_message("127.0.0.1", free_port(), build_oru(message()), "XT7", timeout_s=5)
