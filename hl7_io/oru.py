"""The ORU^R01 that tells a RIS a study's triage priority, and reading one back.

Segments (HL7 v2.5): MSH; PID (patient id and name from the study, as the RIS matches them);
ORC (status "SC"); OBR (filler order number and Placer Field 1 = accession number, universal
service ``XRT-TRIAGE`` of the local scheme ``99XRT``, result status P: preliminary, because
nobody has verified it); OBX per item, all with result status P:

1. ``PRIORITY`` (ST) the worklist priority (``urgent``, ``soon``, ``routine``);
2. ``PRIORITY_REASON`` (TX) why, in words;
3. one NM per finding, coded in SNOMED CT as in the SR, the calibrated probability, with
   abnormal flag ``A`` when flagged at the site's operating point, else ``N``, and the
   threshold in OBX-7 (reference range ``<threshold``);
4. ``STUDY_UID`` (ST) the Study Instance UID; ``MODEL`` (ST) the model and preprocessing
   version; ``DISCLAIMER`` (TX) "Decision support – not for diagnostic use".

Values are escaped with the message's own separators (python-hl7), so a reason holding ``|``
or ``^`` cannot break the structure; non-ASCII text travels as UTF-8 (MSH-18).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import hl7

LOCAL_SCHEME = "99XRT"
SENDING_APPLICATION = "XRAY_TRIAGE"
DISCLAIMER = "Decision support – not for diagnostic use"


@dataclass(frozen=True)
class FindingLine:
    name: str
    display: str
    code: tuple[str, str, str]  # (value, scheme, meaning), e.g. ("233604007", "SCT", "Pneumonia")
    probability: float
    threshold: float
    flagged: bool


@dataclass(frozen=True)
class PriorityMessage:
    """What the RIS is told about one scored study."""

    control_id: str
    when: datetime
    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    priority: str
    reason: str
    model: str
    findings: Sequence[FindingLine]
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""


def _separators() -> hl7.Message:
    """A message with our encoding characters, for python-hl7's escaping."""
    return hl7.parse("MSH|^~\\&|" + SENDING_APPLICATION)


def build_oru(msg: PriorityMessage) -> str:
    """The message as ER7 text (segments separated by CR)."""
    container = _separators()

    def e(value: object) -> str:
        # Separators and control characters escaped; other text kept as is, since MSH-18 says
        # UTF-8 (python-hl7 would write non-ASCII as \X..\ of the code point, not of its bytes).
        return "".join(c if ord(c) > 0x7E else str(container.escape(c)) for c in str(value or ""))

    stamp = msg.when.strftime("%Y%m%d%H%M%S")
    msh = (
        f"MSH|^~\\&|{SENDING_APPLICATION}|{e(msg.sending_facility)}|{e(msg.receiving_application)}|"
        f"{e(msg.receiving_facility)}|{stamp}||ORU^R01^ORU_R01|{e(msg.control_id)}|P|2.5|||AL|NE||UNICODE UTF-8"
    )
    name = "^".join(e(part) for part in (msg.patient_name or "").split("^"))
    accession = e(msg.accession_number)
    segments = [
        msh,
        f"PID|1||{e(msg.patient_id)}||{name}",
        f"ORC|SC||{accession}",
        f"OBR|1||{accession}|XRT-TRIAGE^AI chest X-ray triage^{LOCAL_SCHEME}|||{stamp}|||||||||||{accession}|||||||P",
    ]
    obx: list[tuple[str, str, str, str, str]] = [
        ("ST", f"PRIORITY^Worklist priority^{LOCAL_SCHEME}", e(msg.priority), "", ""),
        ("TX", f"PRIORITY_REASON^Priority reason^{LOCAL_SCHEME}", e(msg.reason), "", ""),
    ]
    for f in msg.findings:
        value, scheme, meaning = f.code
        obx.append(
            (
                "NM",
                f"{e(value)}^{e(meaning)}^{e(scheme)}",
                f"{f.probability:.4f}",
                f"<{f.threshold:.4f}",
                "A" if f.flagged else "N",
            )
        )
    obx += [
        ("ST", f"STUDY_UID^Study Instance UID^{LOCAL_SCHEME}", e(msg.study_uid), "", ""),
        ("ST", f"MODEL^Model^{LOCAL_SCHEME}", e(msg.model), "", ""),
        ("TX", f"DISCLAIMER^Disclaimer^{LOCAL_SCHEME}", e(DISCLAIMER), "", ""),
    ]
    for n, (kind, ident, value, ref_range, abnormal) in enumerate(obx, start=1):
        segments.append(f"OBX|{n}|{kind}|{ident}||{value}||{ref_range}|{abnormal}|||P|||{stamp}")
    return "\r".join(segments)


@dataclass(frozen=True)
class ParsedOru:
    """An ORU read back: what a receiver sees (used by tests and by anyone checking a message)."""

    control_id: str
    accession_number: str
    study_uid: str
    priority: str
    reason: str
    probabilities: dict[str, float]  # by finding code value
    flagged: dict[str, bool]


def parse_oru(text: str) -> ParsedOru:
    message = hl7.parse(text)
    values: dict[str, str] = {}
    probabilities: dict[str, float] = {}
    flagged: dict[str, bool] = {}
    for obx in message.segments("OBX"):
        code = str(obx(3)(1)(1)(1))
        value = message.unescape(str(obx(5)))
        if str(obx(2)) == "NM":
            probabilities[code] = float(value)
            flagged[code] = str(obx(8)) == "A"
        else:
            values[code] = value
    return ParsedOru(
        control_id=str(message.segment("MSH")(10)),
        accession_number=message.unescape(str(message.segment("OBR")(3))),
        study_uid=values.get("STUDY_UID", ""),
        priority=values.get("PRIORITY", ""),
        reason=values.get("PRIORITY_REASON", ""),
        probabilities=probabilities,
        flagged=flagged,
    )
