"""From a claimed study to stored results: instances -> eligibility -> pixel path -> model -> triage.

Three steps with the I/O at the edges: ``pending_instances`` reads the database,
``run_pipeline`` reads the spool, runs the model and writes heatmap PNGs, ``store_results``
writes the results and the study's final state in ONE transaction.  Results are keyed by
(instance, model version) and inserted with ON CONFLICT DO NOTHING, so a redelivered or
re-queued task never writes an instance twice; instances already stored are not re-scored.

Each instance is flagged at its own operating point: the population its DICOM header gives
(``models.operating_points``, the rule ``xray-triage predict`` uses too) picks the card's
thresholds, with the site's overrides on top; those thresholds are stored with its result and
are the ones the study decision judges it at.

Per-instance failures that cannot get better by retrying (undecodable pixels, a file that is
not DICOM) become that instance's ``failed`` outcome; database and broker errors propagate
so the task can retry them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Instance, InstanceResult, Series, Study, StudyState
from db.session import dialect_insert
from models.operating_points import ADULT, POPULATIONS, PopulationDecision, decide_population
from worker.config import Settings
from worker.triage import Decision, InstanceOutcome, decide, flags_for, steering_findings, thresholds_for

log = logging.getLogger("xray_triage.scoring")


@dataclass(frozen=True)
class PendingInstance:
    instance_id: int
    sop_instance_uid: str
    spool_path: str
    received_at: datetime


@dataclass(frozen=True)
class StudyWork:
    study_id: int
    study_uid: str
    queued_at: datetime | None
    instances: list[PendingInstance]  # latest version of each SOP Instance UID
    done: list[InstanceOutcome]  # already stored for this model (a redelivery)


@dataclass(frozen=True)
class ReadInstance:
    """An instance after reading: its tensor and population when eligible, else its outcome."""

    tensor: np.ndarray | None
    outcome: InstanceOutcome | None
    point: PopulationDecision | None = None  # decided from the header the pixels came from


@dataclass
class ResultRow:
    """One instance_result row before it is written."""

    instance: PendingInstance
    outcome: InstanceOutcome
    flags: dict[str, bool] | None
    thresholds: dict[str, float] | None
    heatmaps: dict[str, str] | None


def pending_instances(session: Session, study_id: int, model_ref: str) -> StudyWork:
    """The study's current instances, split into those still to score and those already stored."""
    study = session.execute(select(Study.study_uid, Study.queued_at).where(Study.id == study_id)).one()
    latest = (
        select(Instance.sop_instance_uid, func.max(Instance.version).label("v"))
        .join(Series)
        .where(Series.study_id == study_id)
        .group_by(Instance.sop_instance_uid)
        .subquery()
    )
    rows = session.execute(
        select(Instance.id, Instance.sop_instance_uid, Instance.spool_path, Instance.received_at)
        .join(Series)
        .join(latest, (Instance.sop_instance_uid == latest.c.sop_instance_uid) & (Instance.version == latest.c.v))
        .where(Series.study_id == study_id)
        .order_by(Instance.id)
    ).all()
    stored = {
        r.instance_id: r
        for r in session.scalars(
            select(InstanceResult).where(InstanceResult.study_id == study_id, InstanceResult.model_ref == model_ref)
        )
    }
    todo, done = [], []
    for r in rows:
        inst = PendingInstance(int(r[0]), str(r[1]), str(r[2]), r[3])
        if inst.instance_id in stored:
            res = stored[inst.instance_id]
            # Judged at the thresholds it was flagged at, stored with it, not re-derived.
            done.append(
                InstanceOutcome(
                    inst.sop_instance_uid,
                    res.outcome,
                    res.reason,
                    res.scores or {},
                    res.thresholds,
                    res.operating_point,
                )
            )
        else:
            todo.append(inst)
    return StudyWork(study_id, str(study[0]), study[1], todo, done)


# --------------------------------------------------------------------------- pipeline


def _read(inst: PendingInstance, settings: Settings, size: int) -> ReadInstance:
    """Tensor and population for an eligible instance, else its ineligible/failed outcome.

    The population is decided from the same dataset the pixels come from: the file is read once.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from dicom_io.eligibility import check_eligibility
    from dicom_io.errors import PixelError
    from dicom_io.pixels import to_model_tensor

    uid = inst.sop_instance_uid
    path = Path(settings.storage.spool_dir) / inst.spool_path  # stored relative to the spool root
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return ReadInstance(None, InstanceOutcome(uid, "failed", f"unreadable DICOM: {type(exc).__name__}"))
    elig = check_eligibility(ds, settings.eligibility)
    if not elig.eligible:
        return ReadInstance(None, InstanceOutcome(uid, "ineligible", elig.reason))
    try:
        tensor = to_model_tensor(ds, size=size, limits=settings.pixels)
    except PixelError as exc:
        return ReadInstance(None, InstanceOutcome(uid, "failed", f"{type(exc).__name__}: {exc}"))
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one file is permanent for that file
        return ReadInstance(None, InstanceOutcome(uid, "failed", f"pixel data not decodable: {type(exc).__name__}"))
    return ReadInstance(tensor, None, decide_population(ds))


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """Atomic: the worklist never shows half a PNG, a crash leaves at most a temp file."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(pixels).save(fh, format="PNG", compress_level=1)  # 224x224: speed over bytes
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe(uid: str) -> str:
    return "".join(c for c in uid if c.isdigit() or c == ".") or "unknown"


def heatmap_path(settings: Settings, study_uid: str, sop_uid: str, finding: str) -> Path:
    return Path(settings.worker.heatmap_dir) / _safe(study_uid) / f"{_safe(sop_uid)}.{finding}.png"


def model_thresholds(model: Any, settings: Settings, population: str = ADULT) -> dict[str, float]:
    """The thresholds in force for a population: the card's operating point for it, overridden per site.

    A site override in ``triage.thresholds`` wins for every population: the site chose that
    operating point on its own data.
    """
    return thresholds_for(model.thresholds(population), settings.triage)


def operating_points(model: Any, settings: Settings) -> dict[str, dict[str, float]]:
    """The thresholds in force for every population, computed once per study, not once per instance."""
    return {p: model_thresholds(model, settings, p) for p in POPULATIONS}


def instance_thresholds(
    point: PopulationDecision | None, points: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """The thresholds one instance is flagged and judged at: its population's, else the adult ones."""
    return dict(points.get(_population(point), points[ADULT]))


def _population(point: PopulationDecision | None) -> str:
    return point.population if point is not None else ADULT


def card_specificity(card: Any, population: str = ADULT) -> dict[str, float | None]:
    """Validation specificity at each finding's operating threshold, from the model card: that
    population's images at its own point where the card has them, else all images."""
    metrics = card.validation_metrics or {}
    overall = metrics.get("overall", {})
    own = (metrics.get("by_population") or {}).get(population) or {}
    out: dict[str, float | None] = {}
    for f in card.findings:
        spec = ((own.get(f) or {}).get("operating_point") or {}).get("specificity")
        if spec is None:
            spec = ((overall.get(f) or {}).get("operating_point") or {}).get("specificity")
        out[f] = float(spec) if spec is not None else None
    return out


def card_steering(card: Any, settings: Settings, population: str = ADULT) -> frozenset[str]:
    """Findings of the model with this card allowed to raise priority at this site, for images
    judged at a population's operating point."""
    return steering_findings(card_specificity(card, population), settings.triage, card_evidence(card, population))


def card_evidence(card: Any, population: str = ADULT) -> dict[str, Any] | None:
    """The card's within-collection evidence per finding for a population ({} when the card
    has evidence but none for this population: weak); None on cards made before it."""
    evidence = getattr(card, "steering_evidence", None) or None
    return None if evidence is None else dict(evidence.get(population) or {})


def model_steering(model: Any, settings: Settings, population: str = ADULT) -> frozenset[str]:
    """Findings of this model allowed to raise priority at this site (adult point by default)."""
    return card_steering(model.card, settings, population)


def steering_points(model: Any, settings: Settings) -> dict[str, frozenset[str]]:
    """The steering findings for every population, like ``operating_points`` for thresholds."""
    return {p: model_steering(model, settings, p) for p in POPULATIONS}


def run_pipeline(
    model: Any, work: StudyWork, settings: Settings, points: Mapping[str, Mapping[str, float]]
) -> tuple[list[ResultRow], float]:
    """Score every pending instance in batches; returns rows and the forward-pass seconds.

    `points` are the thresholds in force per population (``operating_points``); each instance
    is flagged, given heatmaps and stored at its own population's (``instance_thresholds``).

    Heatmaps are stored as RGBA PNGs of the map alone (``models.gradcam.colorize``), 224x224
    like the model tensor, letterbox padding included: the viewer crops them with
    ``models.gradcam.crop_letterbox`` and overlays them on its own rendering at any opacity.
    """
    from models.heatmap_image import colorize

    findings = list(model.card.findings)
    rows: list[ResultRow] = []
    ready: list[tuple[PendingInstance, np.ndarray, dict[str, float], str]] = []
    for inst in work.instances:
        read = _read(inst, settings, model.input_size)
        if read.outcome is not None or read.tensor is None:
            outcome = read.outcome or InstanceOutcome(inst.sop_instance_uid, "failed", "no pixel data")
            rows.append(ResultRow(inst, outcome, None, None, None))
        else:
            ready.append((inst, read.tensor, instance_thresholds(read.point, points), _population(read.point)))
    forward_s = 0.0
    bs = settings.worker.batch_size
    for start in range(0, len(ready), bs):
        chunk = ready[start : start + bs]
        x = np.stack([t for _, t, _, _ in chunk])
        t0 = time.perf_counter()
        maps, probs = model.heatmaps(x, findings)  # one forward pass gives scores and every map
        forward_s += time.perf_counter() - t0
        for i, (inst, _tensor, thresholds, population) in enumerate(chunk):
            scores = {f: float(probs[i][j]) for j, f in enumerate(findings)}
            flags = flags_for(scores, thresholds)
            paths: dict[str, str] = {}
            for j, f in enumerate(findings):
                if flags.get(f):
                    path = heatmap_path(settings, work.study_uid, inst.sop_instance_uid, f)
                    _write_png(path, colorize(maps[i, j]))
                    paths[f] = str(path)
            outcome = InstanceOutcome(inst.sop_instance_uid, "scored", None, scores, thresholds, population)
            rows.append(ResultRow(inst, outcome, flags, dict(thresholds), paths))
    return rows, forward_s


# --------------------------------------------------------------------------- storing


def store_results(
    session: Session,
    work: StudyWork,
    rows: list[ResultRow],
    model_ref: str,
    pipeline_version: str,
    started_at: datetime,
    now: datetime,
) -> None:
    """Insert the rows; an (instance, model) pair stored by an earlier delivery is left alone."""
    if not rows:
        return
    values = [
        {
            "instance_id": r.instance.instance_id,
            "study_id": work.study_id,
            "model_ref": model_ref,
            "outcome": r.outcome.outcome,
            "reason": r.outcome.reason,
            "scores": dict(r.outcome.scores) or None,
            "flags": r.flags,
            "thresholds": r.thresholds,
            "operating_point": r.outcome.population if r.outcome.outcome == "scored" else None,
            "heatmaps": r.heatmaps,
            "pipeline_version": pipeline_version,
            "received_at": r.instance.received_at,
            "queued_at": work.queued_at,
            "started_at": started_at,
            "finished_at": now,
        }
        for r in rows
    ]
    stmt = (
        dialect_insert(session, InstanceResult)
        .values(values)
        .on_conflict_do_nothing(index_elements=["instance_id", "model_ref"])
    )
    session.execute(stmt)


def decide_study(
    work: StudyWork,
    rows: list[ResultRow],
    thresholds: Mapping[str, float],
    settings: Settings,
    steering: frozenset[str] | None = None,
    steering_by_population: Mapping[str, frozenset[str]] | None = None,
) -> Decision:
    """The study decision; each instance is judged at the thresholds stored with it, and with
    the steering findings of the operating point it was judged at (``steering_points``).

    `thresholds` and `steering` (the adult point) only judge outcomes that carry none of their own.
    """
    outcomes = [*work.done, *(r.outcome for r in rows)]
    return decide(outcomes, thresholds, settings.triage, steering, steering_by_population)


def final_state(decision: Decision) -> StudyState:
    return StudyState(decision.state)
