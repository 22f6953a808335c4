"""C-STORE SCU: send the objects we wrote to a PACS, and say exactly what it answered.

One association per call, every phase under a timeout (connection, A-ASSOCIATE, each DIMSE
exchange), so a dead or silent destination costs one bounded wait.  An instance counts as
stored only on status 0x0000; warning statuses (0x0001, 0xBxxx) are stored-with-warning and
recorded as such; anything else, or no answer, is a failure of that instance.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

# What the objects are written in, and the fallback every SCP must accept.
PROPOSED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class SendError(Exception):
    """No association, or one that accepted nothing we need; the text says which and where."""


@dataclass(frozen=True)
class StoreResult:
    sop_instance_uid: str
    status: int | None  # None: no response
    comment: str = ""

    @property
    def stored(self) -> bool:
        return self.status is not None and (self.status == 0x0000 or self.warning)

    @property
    def warning(self) -> bool:
        return self.status is not None and (self.status == 0x0001 or (self.status & 0xF000) == 0xB000)

    def describe(self) -> str:
        if self.status is None:
            return "no response"
        text = f"0x{self.status:04X}"
        if self.warning:
            text += " (warning)"
        return f"{text} {self.comment}".strip()


def as_written(ds: Dataset) -> Dataset:
    """`ds` as it reads back from a Part 10 file: encoded once, so what is sent is what was validated."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def store(
    datasets: Sequence[Dataset],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout_s: float,
) -> list[StoreResult]:
    """C-STORE `datasets` over one association; one result per dataset, in order."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, list(PROPOSED_TRANSFER_SYNTAXES))
    assoc = ae.associate(host, port, ae_title=called_ae)
    where = f"{called_ae} at {host}:{port}"
    if assoc.is_rejected:
        raise SendError(f"association rejected by {where}")
    if not assoc.is_established:
        raise SendError(f"no association with {where} (connection refused, timed out or aborted)")
    results: list[StoreResult] = []
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if str(ds.SOPClassUID) not in accepted:
                results.append(StoreResult(uid, None, f"{where} accepted no presentation context for it"))
                continue
            if not assoc.is_established:
                results.append(StoreResult(uid, None, "association lost"))
                continue
            status = assoc.send_c_store(ds)
            if "Status" in status:
                results.append(StoreResult(uid, int(status.Status), str(status.get("ErrorComment", "") or "")))
            else:
                results.append(StoreResult(uid, None, "no C-STORE response (timeout or abort)"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
