"""Site performance over a period, per finding, from the stored results and the recorded truth.

A study counts once per finding: its score is the highest of its scored images (as its
priority was decided), flagged when any image was flagged at the site's threshold.  Truth is
the radiologist's label for the study (``present`` = 1, ``absent`` = 0; ``uncertain`` is left
out of every figure that needs a label).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Export, ExportState, GroundTruth, InstanceResult, Study, StudyState, TruthLabel
from models.findings import FINDING_NAMES, UNLABELLED
from models.metrics import (
    bootstrap_auc_ci,
    bootstrap_rate_ci,
    population_stability_index,
    safe_auc,
    score_histogram,
    threshold_for_sensitivity,
)


@dataclass(frozen=True)
class Filters:
    since: datetime
    until: datetime
    calling_ae: str | None = None
    model_ref: str | None = None


@dataclass
class StudyScores:
    study_id: int
    calling_ae: str
    model_ref: str
    population: str
    scores: dict[str, float] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    truth: dict[str, int] = field(default_factory=dict)  # 1 present, 0 absent


def scored_studies(session: Session, f: Filters) -> list[StudyScores]:
    """Scored studies finished within the period (and matching the filters), with truth."""
    where = [Study.state == StudyState.SCORED, Study.finished_at >= f.since, Study.finished_at < f.until]
    if f.calling_ae:
        where.append(Study.calling_ae == f.calling_ae)
    if f.model_ref:
        where.append(Study.model_ref == f.model_ref)
    studies = {
        sid: StudyScores(sid, ae, ref or "", "adult")
        for sid, ae, ref in session.execute(select(Study.id, Study.calling_ae, Study.model_ref).where(*where))
    }
    if not studies:
        return []
    ids = list(studies)
    for chunk in range(0, len(ids), 500):
        part = ids[chunk : chunk + 500]
        results = session.execute(
            select(InstanceResult, Study.model_ref)
            .join(Study, Study.id == InstanceResult.study_id)
            .where(InstanceResult.study_id.in_(part), InstanceResult.outcome == "scored")
        ).all()
        for res, ref in results:
            if res.model_ref != ref:
                continue  # an older model's result for a re-scored study
            s = studies[res.study_id]
            for name, score in (res.scores or {}).items():
                if score > s.scores.get(name, -1.0):
                    s.scores[name] = float(score)
                    s.thresholds[name] = float((res.thresholds or {}).get(name, 0.5))
                    s.population = res.operating_point or s.population
                s.flags[name] = s.flags.get(name, False) or bool((res.flags or {}).get(name))
        for t in session.scalars(select(GroundTruth).where(GroundTruth.study_id.in_(part))):
            if t.label != TruthLabel.UNCERTAIN:
                studies[t.study_id].truth[t.finding] = 1 if t.label == TruthLabel.PRESENT else 0
    return [s for s in studies.values() if s.scores]


def _rate(hits: np.ndarray, n_boot: int) -> dict[str, Any]:
    if len(hits) == 0:
        return {"value": None, "ci95": None, "n": 0}
    ci = bootstrap_rate_ci(hits, n_boot=n_boot)
    return {"value": float(hits.mean()), "ci95": list(ci) if ci else None, "n": len(hits)}


def finding_figures(
    studies: list[StudyScores],
    name: str,
    reference: dict[str, dict[str, list[int]]],
    psi_alarm: float,
    n_boot: int,
    target_sensitivity: float | None = None,
    min_drift_studies: int = 1,
) -> dict[str, Any]:
    rows = [s for s in studies if name in s.scores]
    p = np.array([s.scores[name] for s in rows], dtype="float64")
    flagged = np.array([s.flags.get(name, False) for s in rows], dtype=bool)
    hist = score_histogram(p)
    population = Counter(s.population for s in rows).most_common(1)[0][0] if rows else "adult"
    ref = reference.get(population, {}).get(name)
    psi = population_stability_index(ref, hist) if ref and len(rows) >= min_drift_studies else None
    out: dict[str, Any] = {
        "studies": len(rows),
        "flagged": int(flagged.sum()),
        "flag_rate": float(flagged.mean()) if len(rows) else None,
        "histogram": hist,
        "reference": {"population": population, "histogram": ref} if ref else None,
        "psi": psi,
        "drift_alarm": psi is not None and psi >= psi_alarm,
        "drift_judged": psi is not None,
    }
    labelled = [(i, s.truth[name]) for i, s in enumerate(rows) if name in s.truth]
    y = np.array([v for _, v in labelled], dtype=int)
    idx = np.array([i for i, _ in labelled], dtype=int)
    out["labelled"] = {"n": len(y), "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum())}
    if len(y):
        pl, fl = p[idx], flagged[idx]
        auc = safe_auc(y, pl)
        ci = bootstrap_auc_ci(y, pl, n_boot=n_boot) if auc is not None else None
        out["sensitivity"] = _rate(fl[y == 1].astype(float), n_boot)
        out["specificity"] = _rate((~fl[y == 0]).astype(float), n_boot)
        out["ppv"] = _rate((y[fl] == 1).astype(float), n_boot)
        out["auc"] = {"value": auc, "ci95": list(ci) if ci else None}
        if target_sensitivity is not None and (y == 1).any() and (y == 0).any():
            threshold = threshold_for_sensitivity(y, pl, target_sensitivity)
            spec_hits = (pl[y == 0] < threshold).astype(float)
            sens_hits = (pl[y == 1] >= threshold).astype(float)
            out["proposed"] = {
                "target_sensitivity": target_sensitivity,
                "threshold": threshold,
                "sensitivity": _rate(sens_hits, n_boot),
                "specificity": _rate(spec_hits, n_boot),
            }
    return out


def label_matrix(studies: list[StudyScores]) -> tuple[np.ndarray, np.ndarray]:
    """(y, p) as evaluate's plots take them: one row per study, UNLABELLED where no truth."""
    y = np.full((len(studies), len(FINDING_NAMES)), UNLABELLED, dtype=int)
    p = np.zeros((len(studies), len(FINDING_NAMES)), dtype="float64")
    for i, s in enumerate(studies):
        for j, n in enumerate(FINDING_NAMES):
            p[i, j] = s.scores.get(n, 0.0)
            if n in s.truth:
                y[i, j] = s.truth[n]
    return y, p


def operational(session: Session, f: Filters) -> dict[str, Any]:
    """Time to priority (p50/p95), final states and export failures over the period."""
    where = [Study.finished_at >= f.since, Study.finished_at < f.until]
    if f.calling_ae:
        where.append(Study.calling_ae == f.calling_ae)
    times = np.array(
        [
            t
            for (t,) in session.execute(
                select(Study.time_to_priority_s).where(*where, Study.time_to_priority_s.is_not(None))
            )
        ],
        dtype="float64",
    )
    states = Counter(str(s) for (s,) in session.execute(select(Study.state).where(*where)))
    n_failed_exports = session.scalar(
        select(func.count())
        .select_from(Export)
        .where(Export.state == ExportState.FAILED, Export.updated_at >= f.since, Export.updated_at < f.until)
    )
    return {
        "time_to_priority_s": {
            "n": len(times),
            "p50": float(np.quantile(times, 0.5)) if len(times) else None,
            "p95": float(np.quantile(times, 0.95)) if len(times) else None,
        },
        "final_states": {s: states.get(s, 0) for s in ("scored", "ineligible", "failed")},
        "export_failures": int(n_failed_exports or 0),
    }


def breakdown(studies: list[StudyScores]) -> list[dict[str, Any]]:
    """Studies and flags per (calling AE, model version)."""
    groups: dict[tuple[str, str], list[StudyScores]] = defaultdict(list)
    for s in studies:
        groups[(s.calling_ae, s.model_ref)].append(s)
    out = []
    for (ae, ref), rows in sorted(groups.items()):
        out.append(
            {
                "calling_ae": ae,
                "model": ref,
                "studies": len(rows),
                "flag_rate": {n: sum(r.flags.get(n, False) for r in rows) / len(rows) for n in FINDING_NAMES},
            }
        )
    return out


def site_performance(
    session: Session,
    f: Filters,
    reference: dict[str, dict[str, list[int]]],
    psi_alarm: float,
    n_boot: int = 500,
    target_sensitivity: float | None = None,
    min_drift_studies: int = 1,
) -> dict[str, Any]:
    studies = scored_studies(session, f)
    return {
        "period": {"since": f.since.isoformat(), "until": f.until.isoformat()},
        "filters": {"calling_ae": f.calling_ae, "model": f.model_ref},
        "studies": len(studies),
        "findings": {
            n: finding_figures(studies, n, reference, psi_alarm, n_boot, target_sensitivity, min_drift_studies)
            for n in FINDING_NAMES
        },
        "breakdown": breakdown(studies),
        "operational": operational(session, f),
    }


def _scores_by_study(
    session: Session, study_ids: list[int], model_ref: str
) -> dict[int, tuple[dict[str, float], dict[str, bool]]]:
    """Per study, one model's highest score and any flag per finding."""
    out: dict[int, tuple[dict[str, float], dict[str, bool]]] = {}
    for chunk in range(0, len(study_ids), 500):
        part = study_ids[chunk : chunk + 500]
        rows = session.scalars(
            select(InstanceResult).where(
                InstanceResult.study_id.in_(part),
                InstanceResult.model_ref == model_ref,
                InstanceResult.outcome == "scored",
            )
        )
        for res in rows:
            scores, flags = out.setdefault(res.study_id, ({}, {}))
            for name, score in (res.scores or {}).items():
                scores[name] = max(float(score), scores.get(name, -1.0))
                flags[name] = flags.get(name, False) or bool((res.flags or {}).get(name))
    return out


def compare_models(
    session: Session, f: Filters, primary_ref: str, shadow_ref: str, n_boot: int = 500
) -> dict[str, Any]:
    """The primary and the shadow on the same studies: flag rates, agreement and, with truth, AUCs."""
    studies = {s.study_id: s for s in scored_studies(session, Filters(f.since, f.until, f.calling_ae, primary_ref))}
    shadow = _scores_by_study(session, list(studies), shadow_ref)
    both = [sid for sid in studies if sid in shadow]
    findings: dict[str, Any] = {}
    for name in FINDING_NAMES:
        ids = [sid for sid in both if name in studies[sid].scores and name in shadow[sid][0]]
        pf = np.array([studies[sid].flags.get(name, False) for sid in ids], dtype=bool)
        sf = np.array([shadow[sid][1].get(name, False) for sid in ids], dtype=bool)
        entry: dict[str, Any] = {
            "studies": len(ids),
            "primary_flag_rate": float(pf.mean()) if len(ids) else None,
            "shadow_flag_rate": float(sf.mean()) if len(ids) else None,
            "agreement": float((pf == sf).mean()) if len(ids) else None,
        }
        labelled = [sid for sid in ids if name in studies[sid].truth]
        if labelled:
            y = np.array([studies[sid].truth[name] for sid in labelled], dtype=int)
            for who, scores in (
                ("primary", [studies[sid].scores[name] for sid in labelled]),
                ("shadow", [shadow[sid][0][name] for sid in labelled]),
            ):
                p = np.array(scores, dtype="float64")
                auc = safe_auc(y, p)
                ci = bootstrap_auc_ci(y, p, n_boot=n_boot) if auc is not None else None
                entry[f"{who}_auc"] = {"value": auc, "ci95": list(ci) if ci else None}
            entry["labelled"] = {"n": len(y), "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum())}
        findings[name] = entry
    return {"primary": primary_ref, "shadow": shadow_ref, "studies": len(both), "findings": findings}
