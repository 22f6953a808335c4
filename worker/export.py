"""Results back to the PACS and the RIS: the export rows, and sending one of them.

A scored study gets one ``export`` row per configured destination, written in the transaction
that stores its result (``create_exports``), so a crash between scoring and sending forgets
nothing.  Each row is sent by its own task on the export queue (``run_export``): a dead
destination delays only its own rows.  An attempt takes a lease on the row (attempts + 1,
``next_attempt_at`` pushed past the attempt's longest wait) so duplicate messages and the
sweeper's re-publishing never send it twice at once; a failure schedules the next attempt
with capped exponential backoff, and after ``export.max_attempts`` the row is
``export_failed`` with the last status or error.  Nothing is ``sent`` unless every object was
stored (C-STORE status 0x0000, or a warning, recorded as such) or the RIS acknowledged
(MSA-1 AA/CA).  The objects' UIDs are deterministic, so a retry re-sends the same instances.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState, Instance, InstanceResult, Series, Study, StudyState, utcnow
from db.session import session_scope
from dicom_io.derived import Algorithm
from dicom_io.sc import HeatmapCapture, build_heatmap_capture
from dicom_io.send import SendError, as_written, store
from dicom_io.sr import FindingResult, ImageResult, TriageReport, build_triage_report
from hl7_io.mllp import Hl7SendError, send_message
from hl7_io.oru import FindingLine, PriorityMessage, build_oru
from models.card import ModelCard
from models.findings import FINDING_NAMES, get_finding
from models.heatmap_image import crop_letterbox
from models.registry import resolve_model_path
from settings import ExportDestination, Settings
from triage.operating import card_steering, steering_reasons
from triage.policy import Level
from triage.site import site_settings

log = logging.getLogger("xray_triage.export")

SILENT_HOLD = "held: triage runs in silent mode and export.in_silent_mode is off"


def backoff_s(attempts: int, base: float, cap: float) -> float:
    return float(min(cap, base * 2 ** min(max(attempts - 1, 0), 30)))


def create_exports(session: Session, study_id: int, generation: int, model_ref: str, settings: Settings) -> list[int]:
    """One row per destination for this result, in the caller's transaction; returns the ids to publish.

    Rows of an earlier result of the study that were not sent yet are superseded: the newer
    result replaces them (its objects have new UIDs, its message the new priority)."""
    cfg = settings.export
    if not cfg.destinations:
        return []
    now = utcnow()
    session.execute(
        update(Export)
        .where(
            Export.study_id == study_id,
            Export.generation < generation,
            Export.state.in_([ExportState.PENDING, ExportState.FAILED, ExportState.HELD]),
        )
        .values(state=ExportState.SUPERSEDED, updated_at=now, last_error="a newer result of the study replaced it")
    )
    held = settings.triage.silent_mode and not cfg.in_silent_mode
    rows = [
        Export(
            study_id=study_id,
            destination=d.name,
            kind=d.kind,
            generation=generation,
            model_ref=model_ref,
            state=ExportState.HELD if held else ExportState.PENDING,
            attempts=0,
            last_error=SILENT_HOLD if held else None,
            created_at=now,
            updated_at=now,
            next_attempt_at=None if held else now,
        )
        for d in cfg.destinations
        if session.scalar(
            select(Export.id).where(
                Export.study_id == study_id, Export.destination == d.name, Export.generation == generation
            )
        )
        is None
    ]
    session.add_all(rows)
    session.flush()
    return [] if held else [r.id for r in rows]


# --------------------------------------------------------------------------- what is sent


@dataclass(frozen=True)
class ScoredImage:
    sop_instance_uid: str
    spool_path: str
    scores: dict[str, float]
    flags: dict[str, bool]
    thresholds: dict[str, float]
    heatmaps: dict[str, str]
    operating_point: str
    pipeline_version: str


def scored_images(session: Session, study_id: int, model_ref: str) -> list[ScoredImage]:
    """The study's scored images for this model, latest version of each SOP Instance UID, in arrival order."""
    rows = session.execute(
        select(Instance, InstanceResult)
        .join(Series, Instance.series_id == Series.id)
        .join(InstanceResult, InstanceResult.instance_id == Instance.id)
        .where(Series.study_id == study_id, InstanceResult.model_ref == model_ref, InstanceResult.outcome == "scored")
        .order_by(Instance.sop_instance_uid, Instance.version.desc())
    ).all()
    latest: dict[str, ScoredImage] = {}
    order: dict[str, int] = {}
    for inst, res in rows:
        if inst.sop_instance_uid in latest:
            continue
        order[inst.sop_instance_uid] = inst.id
        latest[inst.sop_instance_uid] = ScoredImage(
            inst.sop_instance_uid,
            inst.spool_path,
            dict(res.scores or {}),
            dict(res.flags or {}),
            dict(res.thresholds or {}),
            dict(res.heatmaps or {}),
            res.operating_point or "adult",
            res.pipeline_version,
        )
    return sorted(latest.values(), key=lambda s: order[s.sop_instance_uid])


@cache
def _card(path: str) -> ModelCard | None:
    try:
        return ModelCard.load(Path(path).parent / "card.json")
    except Exception:  # noqa: BLE001 - without a card, steering is reported as unknown
        return None


def steering(settings: Settings, model_ref: str, population: str) -> tuple[frozenset[str], dict[str, str]]:
    """Findings that steer for this model at this population's point, and why (empty when its card is gone)."""
    card = _card(str(resolve_model_path(settings=settings)))
    if card is None or card.ref != model_ref:
        return frozenset(), {f: "steering unknown: this model's card is no longer installed" for f in FINDING_NAMES}
    return card_steering(card, settings, population), steering_reasons(card, settings).get(population, {})


def algorithm_of(model_ref: str, pipeline_version: str) -> Algorithm:
    name, _, version = model_ref.partition("@")
    return Algorithm(name, version or "unknown", pipeline_version)


def finding_results(image: ScoredImage, steers: frozenset[str], why: dict[str, str]) -> list[FindingResult]:
    out = []
    for name in FINDING_NAMES:
        if name not in image.scores:
            continue
        f = get_finding(name)
        out.append(
            FindingResult(
                name,
                f.display,
                f.code,
                float(image.scores[name]),
                float(image.thresholds.get(name, f.default_threshold)),
                bool(image.flags.get(name)),
                name in steers,
                why.get(name, ""),
            )
        )
    return out


def priority_label(priority: int | None) -> str:
    return Level(priority).name.lower() if priority is not None else "routine"


@dataclass(frozen=True)
class Outgoing:
    dataset: Dataset
    kind: str  # "sr" | "heatmap"
    label: str


def dicom_objects(
    session: Session, export: Export, study: Study, destination: ExportDestination, settings: Settings
) -> list[Outgoing]:
    """The SR and the heatmap images for this export, as they will be sent."""
    images = scored_images(session, study.id, export.model_ref)
    if not images:
        raise ValueError("no scored image of this study for this model")
    algorithm = algorithm_of(export.model_ref, images[0].pipeline_version)
    when = study.finished_at or study.state_changed_at
    kinds = destination.object_kinds
    out: list[Outgoing] = []
    results = []
    spool = Path(settings.storage.spool_dir)  # spool paths are stored relative to its root
    for n, image in enumerate(images, start=1):
        steers, why = steering(settings, export.model_ref, image.operating_point)
        findings = finding_results(image, steers, why)
        if "heatmaps" in kinds:
            source = pydicom.dcmread(spool / image.spool_path)
            for f in findings:
                path = image.heatmaps.get(f.name)
                if not f.flagged or not path:
                    continue
                with Image.open(path) as im:
                    rgba = np.asarray(im.convert("RGBA"))
                capture = HeatmapCapture(
                    source,
                    np.ascontiguousarray(crop_letterbox(rgba, (int(source.Rows), int(source.Columns)))),
                    f.name,
                    f.display,
                    FINDING_NAMES.index(f.name),
                    algorithm,
                    when,
                    instance_number=n,
                )
                sc = build_heatmap_capture(capture, settings.pixels)
                out.append(Outgoing(as_written(sc), "heatmap", f"heatmap {f.display}, image {n}"))
        header = pydicom.dcmread(spool / image.spool_path, stop_before_pixels=True)
        results.append(ImageResult(header, findings))
    if "sr" in kinds:
        report = TriageReport(
            study.study_uid, results, priority_label(study.priority), study.priority_reason or "", algorithm, when
        )
        out.insert(0, Outgoing(as_written(build_triage_report(report)), "sr", "structured report"))
    return out


def priority_message(
    session: Session, export: Export, study: Study, destination: ExportDestination, settings: Settings
) -> PriorityMessage:
    images = scored_images(session, study.id, export.model_ref)
    # The study's opinion per finding: its highest score, flagged when any image was.
    lines: dict[str, FindingLine] = {}
    for image in images:
        for name in FINDING_NAMES:
            if name not in image.scores:
                continue
            f = get_finding(name)
            score = float(image.scores[name])
            flagged = bool(image.flags.get(name))
            old = lines.get(name)
            if old is None or score > old.probability:
                threshold = float(image.thresholds.get(name, f.default_threshold))
                code = (f.code.value, f.code.scheme_designator, f.code.meaning)
                lines[name] = FindingLine(name, f.display, code, score, threshold, flagged or bool(old and old.flagged))
            elif flagged:
                lines[name] = FindingLine(old.name, old.display, old.code, old.probability, old.threshold, True)
    pipeline = images[0].pipeline_version if images else ""
    return PriorityMessage(
        control_id=f"XT{export.id}",
        when=study.finished_at or study.state_changed_at,
        study_uid=study.study_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        priority=priority_label(study.priority),
        reason=study.priority_reason or "",
        model=f"{export.model_ref} (preprocessing {pipeline})",
        findings=[lines[n] for n in FINDING_NAMES if n in lines],
        sending_facility=settings.export.sending_facility,
        receiving_application=destination.receiving_application,
        receiving_facility=destination.receiving_facility,
    )


# --------------------------------------------------------------------------- one attempt


@dataclass(frozen=True)
class Attempt:
    """The outcome of one try: per-object status, and the error if it did not all go."""

    objects: list[dict[str, str]]
    error: str | None


def _send_dicom(objects: list[Outgoing], destination: ExportDestination, settings: Settings) -> Attempt:
    cfg = settings.export
    listed = [
        {"kind": o.kind, "uid": str(o.dataset.SOPInstanceUID), "label": o.label, "status": "pending"} for o in objects
    ]
    try:
        results = store(
            [o.dataset for o in objects],
            destination.host,
            destination.port,
            str(destination.ae_title),
            cfg.calling_ae_title,
            cfg.timeout_s,
        )
    except SendError as exc:
        for item in listed:
            item["status"] = "not sent"
        return Attempt(listed, str(exc))
    failed = []
    for item, result in zip(listed, results, strict=True):
        item["status"] = (
            "stored"
            if result.status == 0
            else ("stored with warning " + result.describe() if result.stored else "failed " + result.describe())
        )
        if not result.stored:
            failed.append(f"{item['label']}: {result.describe()}")
    return Attempt(listed, "; ".join(failed) if failed else None)


def _send_hl7(message: PriorityMessage, destination: ExportDestination, settings: Settings) -> Attempt:
    item = {"kind": "oru", "uid": message.control_id, "label": "ORU^R01 priority message", "status": "pending"}
    try:
        ack = send_message(
            destination.host, destination.port, build_oru(message), message.control_id, settings.export.timeout_s
        )
    except Hl7SendError as exc:
        item["status"] = "not accepted"
        return Attempt([item], str(exc))
    item["status"] = f"acknowledged {ack.code}"
    return Attempt([item], None)


Publish = Callable[[int, float | None], None]


def _claim(factory: sessionmaker[Session], export_id: int, settings: Settings, now: datetime) -> int | None:
    """Take the lease of a pending, due export; its attempt number, or None when not ours to send."""
    lease = timedelta(seconds=4 * settings.export.timeout_s + 60)
    with session_scope(factory) as session:
        row = session.get(Export, export_id)
        if row is None or row.state != ExportState.PENDING:
            return None
        if row.next_attempt_at is not None and row.next_attempt_at > now + timedelta(seconds=1):
            return None  # another message is scheduled for it, or an attempt holds the lease
        attempt = row.attempts + 1  # read first: the ORM update below refreshes `row`
        result = session.execute(
            update(Export)
            .where(Export.id == export_id, Export.state == ExportState.PENDING, Export.attempts == attempt - 1)
            .values(attempts=attempt, next_attempt_at=now + lease, updated_at=now)
        )
        return attempt if getattr(result, "rowcount", 0) else None


def run_export(factory: sessionmaker[Session], settings: Settings, export_id: int, publish: Publish) -> str:
    """One attempt at sending export `export_id`; schedules the next one on failure. Returns its state."""
    now = utcnow()
    attempt_no = _claim(factory, export_id, settings, now)
    if attempt_no is None:
        return "ignored"
    with factory() as session:
        export = session.get(Export, export_id)
        assert export is not None
        settings = site_settings(session, settings)  # steering read from the model now primary
        study = session.get(Study, export.study_id)
        destination = settings.export.destination(export.destination)
        try:
            if destination is None:
                raise LookupError(f"destination {export.destination!r} is no longer configured")
            if study is None or study.state != StudyState.SCORED:
                raise LookupError("the study is no longer scored")
            if destination.kind == "dicom":
                attempt = _send_dicom(
                    dicom_objects(session, export, study, destination, settings), destination, settings
                )
            else:
                attempt = _send_hl7(
                    priority_message(session, export, study, destination, settings), destination, settings
                )
        except Exception as exc:  # noqa: BLE001 - a broken source file or config: recorded, retried, never "sent"
            log.warning("export %d to %s: could not prepare: %s", export_id, export.destination, type(exc).__name__)
            attempt = Attempt(list(export.objects or []), f"could not prepare: {type(exc).__name__}: {exc}")
    return _record(factory, settings, export_id, attempt_no, attempt, publish)


def _record(
    factory: sessionmaker[Session],
    settings: Settings,
    export_id: int,
    attempt_no: int,
    attempt: Attempt,
    publish: Publish,
) -> str:
    cfg = settings.export
    now = utcnow()
    retry_in: float | None = None
    with session_scope(factory) as session:
        row = session.get(Export, export_id)
        assert row is not None
        row.objects = attempt.objects
        row.updated_at = now
        if attempt.error is None:
            row.state, row.sent_at, row.last_error, row.next_attempt_at = ExportState.SENT, now, None, None
        elif attempt_no >= cfg.max_attempts:
            row.state, row.last_error, row.next_attempt_at = ExportState.FAILED, attempt.error[:4000], None
        else:
            retry_in = backoff_s(attempt_no, cfg.retry_base_s, cfg.retry_cap_s)
            row.last_error, row.next_attempt_at = attempt.error[:4000], now + timedelta(seconds=retry_in)
        state = str(row.state)
        destination = row.destination
    if attempt.error is None:
        log.info("export %d to %s: sent (attempt %d)", export_id, destination, attempt_no)
    elif retry_in is None:
        log.error(
            "export %d to %s: export_failed after %d attempts: %s", export_id, destination, attempt_no, attempt.error
        )
    else:
        log.warning(
            "export %d to %s: attempt %d failed, next in %.0f s: %s",
            export_id,
            destination,
            attempt_no,
            retry_in,
            attempt.error,
        )
        publish(export_id, retry_in)
    return state
