"""From a claimed study to stored results, around the one scoring service (``triage.service``).

Three steps with the I/O at the edges: ``pending_instances`` reads the database,
``run_pipeline_many`` hands the spooled files to the scoring service and writes heatmap PNGs,
``store_results`` writes the results and the study's final state in ONE transaction.  Results are keyed by
(instance, model version) and inserted with ON CONFLICT DO NOTHING, so a redelivered or
re-queued task never writes an instance twice; instances already stored are not re-scored.

Each instance is flagged at its own operating point, as the service decides it for
``xray-triage predict`` and the analyse page too; those thresholds are stored with its result
and are the ones the study decision judges it at.

Per-instance failures that cannot get better by retrying (undecodable pixels, a file that is
not DICOM) become that instance's ``failed`` outcome; database and broker errors propagate
so the task can retry them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Instance, InstanceResult, Series, Study, StudyState
from db.session import dialect_insert
from settings import Settings
from triage.policy import Decision, InstanceOutcome
from triage.service import SCORED, ImageInput, Scorer

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
                    StudyState(res.outcome),
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


PNG_WRITERS = 4


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


def run_pipeline(scorer: Scorer, work: StudyWork, settings: Settings) -> tuple[list[ResultRow], float]:
    """One study's pending instances judged (``run_pipeline_many``); rows and forward-pass seconds."""
    before = scorer.forward_s
    [rows] = run_pipeline_many(scorer, [work], settings)
    return rows, scorer.forward_s - before


def run_pipeline_many(
    scorer: Scorer, works: list[StudyWork], settings: Settings, heatmaps: bool = True
) -> list[list[ResultRow]]:
    """Judge every pending instance of several studies in shared forward passes (``Scorer.judge``);
    one list of rows per study, in order.

    An ineligible instance is not scored.  Heatmaps are stored for flagged findings as RGBA PNGs
    of the map alone (``models.heatmap_image.colorize``), the size of the model tensor,
    letterbox padding included: the viewer crops them with ``crop_letterbox`` and overlays them
    on its own rendering at any opacity.  ``heatmaps=False`` (a shadow model) stores none.
    """
    from models.heatmap_image import colorize

    spool = Path(settings.storage.spool_dir)  # spool paths are stored relative to its root
    inputs = [ImageInput(inst.sop_instance_uid, spool / inst.spool_path) for w in works for inst in w.instances]
    judged = iter(scorer.judge(inputs, heatmaps=heatmaps, batch_size=settings.worker.batch_size))
    findings = list(scorer.model.card.findings)
    out: list[list[ResultRow]] = []
    # Each PNG is fsynced (the worklist links it once the result commits); the waits overlap in
    # a few threads instead of adding up, and all are done before this returns.
    with ThreadPoolExecutor(max_workers=PNG_WRITERS, thread_name_prefix="heatmap-png") as writers:
        written = []
        for work in works:
            rows: list[ResultRow] = []
            for inst in work.instances:
                j = next(judged)
                if j.outcome != SCORED or (heatmaps and j.heatmaps is None):
                    rows.append(ResultRow(inst, j.as_outcome(), None, None, None))
                    continue
                paths: dict[str, str] = {}
                for k, f in enumerate(findings):
                    if j.heatmaps is not None and j.flags.get(f):
                        path = heatmap_path(settings, work.study_uid, inst.sop_instance_uid, f)
                        written.append(writers.submit(_write_png, path, colorize(j.heatmaps[k])))
                        paths[f] = str(path)
                rows.append(ResultRow(inst, j.as_outcome(), j.flags, dict(j.thresholds), paths if heatmaps else None))
            out.append(rows)
        for future in written:
            future.result()  # a failed write fails the batch, as it did inline
    return out


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
            "operating_point": r.outcome.population if r.outcome.outcome is StudyState.SCORED else None,
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


def decide_study(work: StudyWork, rows: list[ResultRow], scorer: Scorer) -> Decision:
    """The study decision by the scoring service: instances scored earlier are judged at the
    thresholds stored with them, new ones at theirs."""
    return scorer.decide([*work.done, *(r.outcome for r in rows)])


def final_state(decision: Decision) -> StudyState:
    return StudyState(decision.state)
