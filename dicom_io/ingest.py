"""From a received file to database rows: header extraction and the instance/series/study upsert.

Kept apart from the network code so the rules (de-duplication by content, versioning of
conflicting bytes, a late instance re-opening its study) can be exercised on plain data.
Every write is safe against a concurrent listener thread, hand-off scanner or worker: rows are
created optimistically (a unique-constraint race is retried) and state changes are
conditional UPDATEs (db.transitions).
"""

from __future__ import annotations

import enum
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Series, StateTransition, Study, StudyState, utcnow
from db.session import session_scope
from db.transitions import move_state
from dicom_io.inflate import InflateError, inflate
from dicom_io.spool import SpooledFile
from dicom_io.structure import IncompleteDatasetError, check_complete
from dicom_io.uids import InvalidUIDError, require_uid, uid_as_sent
from settings import PixelsConfig

log = logging.getLogger("xray_triage.ingest")

DEFLATED = "1.2.840.10008.1.2.1.99"
DEFAULT_MAX_PIXEL_BYTES = PixelsConfig().max_pixel_bytes
PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
URGENT_PRIORITIES = frozenset({"STAT", "HIGH"})


class MalformedDatasetError(ValueError):
    """The received bytes are not a complete dataset we can identify."""


class IdentifierConflictError(ValueError):
    """The instance's identifiers contradict what is already recorded (e.g. a series under two studies)."""


@dataclass(frozen=True)
class InstanceHeader:
    """What we keep from a dataset's header; pixel data is never read here."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_sex: str | None = None
    patient_birth_date: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    requested_priority: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new-version"


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    study_uid: str
    version: int


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = str(value).strip()
    return text[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _requested_priority(ds: Dataset) -> str | None:
    """(0040,1003) Requested Procedure Priority, top level or in the Request Attributes Sequence."""
    value = _text(ds, "RequestedProcedurePriority", 16)
    if value is None:
        for item in ds.get("RequestAttributesSequence") or []:
            value = _text(item, "RequestedProcedurePriority", 16)
            if value:
                break
    return value.upper() if value else None


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """The identifying and descriptive attributes of `ds`; raises MalformedDatasetError/InvalidUIDError."""
    uids = {}
    for keyword, what in (
        ("StudyInstanceUID", "Study Instance UID"),
        ("SeriesInstanceUID", "Series Instance UID"),
        ("SOPInstanceUID", "SOP Instance UID"),
        ("SOPClassUID", "SOP Class UID"),
    ):
        sent = uid_as_sent(ds.get_item(keyword))
        if not sent:
            raise MalformedDatasetError(f"{keyword} is missing")
        uids[keyword] = require_uid(sent, what)
    return InstanceHeader(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        accession_number=_text(ds, "AccessionNumber", 64),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        patient_sex=_text(ds, "PatientSex", 16),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        study_description=_text(ds, "StudyDescription", 64),
        requested_priority=_requested_priority(ds),
        modality=_text(ds, "Modality", 16),
        body_part=_text(ds, "BodyPartExamined", 64),
        view_position=_text(ds, "ViewPosition", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        instance_number=_int(ds, "InstanceNumber"),
    )


def read_received_file(
    path: Path, dataset_offset: int, transfer_syntax_uid: str, max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES
) -> InstanceHeader:
    """Header of a received Part-10 file whose dataset starts at `dataset_offset`.

    Checks that the dataset is structurally complete and carries pixel data (all accepted
    SOP classes are images), so a truncated transfer is refused instead of stored.  A deflated
    dataset is first inflated, as a stream and under a budget, into an anonymous file beside it
    and gets the same check: the file kept in the spool stays the sender's deflated bytes.
    """
    ts = UID(transfer_syntax_uid)
    try:
        if transfer_syntax_uid != DEFLATED:
            with path.open("rb") as fp:
                return _checked_header(fp, dataset_offset, path.stat().st_size, ts.is_implicit_VR, ts.is_little_endian)
        with path.open("rb") as fp, tempfile.TemporaryFile(dir=path.parent) as inflated:
            fp.seek(dataset_offset)
            size = inflate(fp, inflated, max_pixel_bytes)
            return _checked_header(inflated, 0, size, False, True)
    except (MalformedDatasetError, InvalidUIDError):
        raise
    except (IncompleteDatasetError, InflateError) as exc:
        raise MalformedDatasetError(str(exc)) from exc
    except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot parse"
        raise MalformedDatasetError(f"cannot parse dataset: {type(exc).__name__}") from exc


def _checked_header(fp: BinaryIO, start: int, end: int, implicit_vr: bool, little_endian: bool) -> InstanceHeader:
    structure = check_complete(fp, start, end, implicit_vr=implicit_vr, little_endian=little_endian)
    if not structure.has_pixel_data:
        raise MalformedDatasetError("the dataset has no Pixel Data")
    fp.seek(start)
    ds = read_dataset(fp, structure.implicit_vr, little_endian, stop_when=lambda tag, *_: tag == PIXEL_DATA_TAG)
    return header_from_dataset(ds)


def _get_or_create_study(
    session: Session, h: InstanceHeader, calling_ae: str, host: str | None, now: datetime
) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == h.study_uid))
    if study is not None:
        # Keep what the first instance told us; fill gaps from later ones.
        for attr, value in (
            ("accession_number", h.accession_number),
            ("patient_id", h.patient_id),
            ("patient_name", h.patient_name),
            ("patient_sex", h.patient_sex),
            ("patient_birth_date", h.patient_birth_date),
            ("study_date", h.study_date),
            ("study_time", h.study_time),
            ("description", h.study_description),
            ("requested_priority", h.requested_priority),
        ):
            if value is not None and getattr(study, attr) is None:
                setattr(study, attr, value)
        return study
    study = Study(
        study_uid=h.study_uid,
        accession_number=h.accession_number,
        patient_id=h.patient_id,
        patient_name=h.patient_name,
        patient_sex=h.patient_sex,
        patient_birth_date=h.patient_birth_date,
        study_date=h.study_date,
        study_time=h.study_time,
        description=h.study_description,
        requested_priority=h.requested_priority,
        calling_ae=calling_ae,
        calling_host=host,
        received_at=now,
        last_instance_at=now,
        state=StudyState.RECEIVING,
        state_changed_at=now,
        handoff_generation=0,
    )
    session.add(study)
    session.flush()  # IntegrityError here means another thread created it: the caller retries
    session.add(StateTransition(study_id=study.id, from_state=None, to_state=StudyState.RECEIVING, at=now))
    return study


def _get_or_create_series(session: Session, h: InstanceHeader, study: Study) -> Series:
    series = session.scalar(select(Series).where(Series.series_uid == h.series_uid))
    if series is not None:
        if series.study_id != study.id:
            raise IdentifierConflictError("Series Instance UID is already recorded under another study")
        return series
    series = Series(
        series_uid=h.series_uid,
        study_id=study.id,
        modality=h.modality,
        body_part=h.body_part,
        view_position=h.view_position,
        series_number=h.series_number,
        description=h.series_description,
    )
    session.add(series)
    session.flush()
    return series


def _reopen_study(session: Session, study_id: int, now: datetime) -> None:
    """Note a new instance: refresh the quiet timer and put a study in any later state back to receiving.

    Done with conditional UPDATEs so a hand-off claiming the study at this very moment is
    either before us (we re-open it, it is re-queued later) or after us (it sees the new time).
    """
    for _ in range(10):
        touched = session.execute(
            update(Study)
            .where(Study.id == study_id, Study.state == StudyState.RECEIVING)
            .values(last_instance_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if touched:
            return
        current = session.scalar(select(Study.state).where(Study.id == study_id))
        if current is None:
            raise IdentifierConflictError("study disappeared while recording")
        if move_state(
            session,
            study_id,
            StudyState(current),
            StudyState.RECEIVING,
            now,
            reason=f"new instance arrived while {current}",
            values={"last_instance_at": now},
        ):
            return
    raise IdentifierConflictError("study state kept changing while recording")


def record_instance(
    session: Session,
    header: InstanceHeader,
    stored: SpooledFile,
    *,
    transfer_syntax_uid: str,
    calling_ae: str,
    calling_host: str | None,
    now: datetime,
) -> IngestResult:
    """Record one stored instance in the current transaction.

    Same SOP Instance UID and same SHA-256 as a recorded version: a duplicate, nothing
    changes.  Same UID, different bytes: a new version, flagged, study re-opened.
    """
    versions = session.execute(
        select(Instance.version, Instance.sha256).where(Instance.sop_instance_uid == header.sop_instance_uid)
    ).all()
    for version, sha in versions:
        if sha == stored.sha256:
            return IngestResult(Outcome.DUPLICATE, header.study_uid, version)
    study = _get_or_create_study(session, header, calling_ae, calling_host, now)
    series = _get_or_create_series(session, header, study)
    version = max((v for v, _ in versions), default=0) + 1
    session.add(
        Instance(
            sop_instance_uid=header.sop_instance_uid,
            version=version,
            series_id=series.id,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            instance_number=header.instance_number,
            spool_path=stored.relative_path,
            sha256=stored.sha256,
            size_bytes=stored.size,
            received_at=now,
            calling_ae=calling_ae,
            conflicting_version=version > 1,
        )
    )
    session.flush()
    _reopen_study(session, study.id, now)
    return IngestResult(Outcome.NEW_VERSION if version > 1 else Outcome.STORED, header.study_uid, version)


def mark_released(session: Session, study_uids: Iterable[str], now: datetime) -> int:
    """The association that sent these studies' instances was released: they are complete
    from that sender's side.  Only studies still receiving are touched; returns how many."""
    uids = sorted(set(study_uids))
    if not uids:
        return 0
    result = session.execute(
        update(Study).where(Study.study_uid.in_(uids), Study.state == StudyState.RECEIVING).values(released_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def record_with_retry(
    factory: sessionmaker[Session],
    header: InstanceHeader,
    stored: SpooledFile,
    *,
    transfer_syntax_uid: str,
    calling_ae: str,
    calling_host: str | None,
    clock: Callable[[], datetime] = utcnow,
    attempts: int = 5,
) -> IngestResult:
    """record_instance in its own transaction, retried when a concurrent insert wins a unique race."""
    for attempt in range(1, attempts + 1):
        try:
            with session_scope(factory) as session:
                return record_instance(
                    session,
                    header,
                    stored,
                    transfer_syntax_uid=transfer_syntax_uid,
                    calling_ae=calling_ae,
                    calling_host=calling_host,
                    now=clock(),
                )
        except IntegrityError:
            if attempt == attempts:
                raise
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


def is_urgent(requested_priority: str | None) -> bool:
    return (requested_priority or "").upper() in URGENT_PRIORITIES
