"""Triage policy: scores in, priority and worklist order out (data in, data out, no I/O).

Levels are small integers so the worklist can sort on them: CRITICAL (0) before URGENT (1)
before ROUTINE (2).  A study the AI could not score (failed, ineligible, not yet scored) is
ROUTINE and stays on the worklist, marked "AI unavailable – read as usual".

The worklist order is effective priority, then waiting time (oldest first).  The effective
priority escalates a study one level once it has waited longer than the cap of its level,
because ordering by priority alone makes the longest waits longer.  Silent mode records the
model's opinion (``ai_priority``) but stores ROUTINE as the priority, so the order stays by
time until a site has checked the model on its own data.

The worklist calls ``worklist_order(settings.triage, now)`` (SQLAlchemy ORDER BY
clauses) or, for lists already in memory, ``sort_key``/``effective_priority``; it shows the
study's ``top_finding`` and filters on ``flagged_findings`` (see ``Decision``).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func

from db.models import Study, StudyState
from models.findings import FINDING_INDEX
from models.operating_points import ADULT
from settings import TriageConfig

AI_UNAVAILABLE = "AI unavailable – read as usual"


class Level(enum.IntEnum):
    CRITICAL = 0
    URGENT = 1
    ROUTINE = 2


@dataclass(frozen=True)
class InstanceOutcome:
    """What the pipeline produced for one instance: scores (if scored) or why not.

    ``thresholds`` are the ones this instance was flagged at (its population's operating point
    with the site's overrides, as stored in its result row), so the study decision judges
    every instance exactly as its flags and heatmaps were judged.  None: the study-wide
    thresholds given to ``decide`` apply.
    """

    sop_instance_uid: str
    outcome: StudyState  # SCORED | INELIGIBLE | FAILED
    reason: str | None = None
    scores: Mapping[str, float] = field(default_factory=dict)
    thresholds: Mapping[str, float] | None = None
    # The operating point ("adult" | "paediatric") it was judged at; picks which findings steer
    # when ``decide`` is given steering per population.  None: adult.
    population: str | None = None

    def __post_init__(self) -> None:
        # Rows read back from the database and tests give plain strings: one type from here on.
        object.__setattr__(self, "outcome", StudyState(self.outcome))

    def judged_at(self, default: Mapping[str, float]) -> Mapping[str, float]:
        """The thresholds this instance is judged at: its own, else the study-wide default."""
        return self.thresholds if self.thresholds is not None else default


@dataclass(frozen=True)
class Decision:
    """Everything the worker stores on the study once it is final.

    ``top_finding``/``top_score`` and ``flagged_findings`` let the worklist show and filter by
    finding without reading every instance result; they are the model's opinion, so they are
    recorded in silent mode too, and are None when nothing was scored (failed, ineligible).
    """

    state: StudyState  # SCORED | INELIGIBLE | FAILED
    reason: str | None  # state reason (why ineligible / failed)
    priority: int  # what the worklist sorts on
    ai_priority: int  # what the model alone says (== priority unless silent)
    priority_reason: str
    ai_state: str | None  # AI_UNAVAILABLE when nothing could be scored
    # The finding `explain` names first for the instance that set the level: furthest above its
    # threshold, else the closest miss.
    top_finding: str | None = None
    top_score: float | None = None
    # ",pneumonia,covid19,": every finding at or above threshold on any scored instance, in
    # FINDING_NAMES order, comma-delimited on both sides so `LIKE '%,mass,%'` matches exactly
    # one finding on SQLite and PostgreSQL.  None when nothing is flagged (never ",").
    flagged_findings: str | None = None
    # The same for the flagged findings that steer (at their instance's population), the ones
    # the worklist row names; informational findings are in ``flagged_findings`` only.  "," when
    # the study is scored and none steers, so None keeps meaning "not recorded".
    steering_findings: str | None = None


def thresholds_for(card_thresholds: Mapping[str, float], cfg: TriageConfig) -> dict[str, float]:
    """The card's operating thresholds with the site's overrides on top."""
    return {**{k: float(v) for k, v in card_thresholds.items()}, **{k: float(v) for k, v in cfg.thresholds.items()}}


def steering_findings(
    card_specificity: Mapping[str, float | None],
    cfg: TriageConfig,
    evidence: Mapping[str, Mapping[str, Any]] | None = None,
) -> frozenset[str]:
    """Findings allowed to raise a study's priority (TriageConfig.min_steering_specificity and
    min_steering_within_auc).

    `card_specificity` is the model card's validation specificity at each finding's operating
    threshold (None when the card has none: such a finding steers).  `evidence` is the card's
    adult within-collection AUC per finding (``steering_evidence``); a card without it is
    judged on specificity alone, while a finding the card lists without a usable interval has
    weak evidence and does not steer.  A site override of the threshold means the site chose
    its own operating point on its own data, so that finding steers regardless.
    """
    return frozenset(
        f
        for f, spec in card_specificity.items()
        if f in cfg.thresholds
        or (
            (spec is None or spec >= cfg.min_steering_specificity)
            and _evidence_holds(None if evidence is None else evidence.get(f), cfg, evidence is None)
        )
    )


def _evidence_holds(entry: Mapping[str, Any] | None, cfg: TriageConfig, no_evidence_recorded: bool) -> bool:
    if no_evidence_recorded:
        return True
    entry = entry or {}
    ci: Sequence[float] = entry.get("auc_ci95") or ()
    enough = min(int(entry.get("n_pos") or 0), int(entry.get("n_neg") or 0)) >= cfg.min_steering_evidence_images
    return len(ci) > 0 and enough and float(ci[0]) >= cfg.min_steering_within_auc


def steering_explanation(
    finding: str,
    card_specificity: Mapping[str, float | None],
    cfg: TriageConfig,
    evidence: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """Why a finding does or does not steer, in words for the admin page and the card."""
    if finding in cfg.thresholds:
        return "steers: the site set its own threshold"
    spec = card_specificity.get(finding)
    if spec is not None and spec < cfg.min_steering_specificity:
        return f"informational: validation specificity {spec:.2f} at its threshold < {cfg.min_steering_specificity:.2f}"
    if evidence is not None:
        entry = evidence.get(finding) or {}
        if not entry:
            return "informational: no within-collection comparison measures it at this operating point"
        ci = entry.get("auc_ci95")
        name = entry.get("comparison")
        n_pos, n_neg = int(entry.get("n_pos") or 0), int(entry.get("n_neg") or 0)
        if not ci or min(n_pos, n_neg) < cfg.min_steering_evidence_images:
            return (
                f"informational: too little within-collection evidence ({name}: {n_pos} positive, {n_neg} negative "
                f"test images; {cfg.min_steering_evidence_images} of each needed)"
            )
        if float(ci[0]) < cfg.min_steering_within_auc:
            return (
                f"informational: weak within-collection evidence, {name} AUC {float(entry.get('auc') or 0):.2f} "
                f"[{float(ci[0]):.2f}, {float(ci[1]):.2f}], lower end < {cfg.min_steering_within_auc:.2f}"
            )
        return f"steers: {name} AUC {float(entry.get('auc') or 0):.2f} [{float(ci[0]):.2f}, {float(ci[1]):.2f}]"
    return "steers"


def flags_for(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> dict[str, bool]:
    return {f: bool(s >= thresholds[f]) for f, s in scores.items() if f in thresholds}


def instance_level(scores: Mapping[str, float], thresholds: Mapping[str, float], cfg: TriageConfig) -> Level:
    """CRITICAL if any score reaches its critical threshold, URGENT if any reaches its threshold."""
    level = Level.ROUTINE
    for finding, score in scores.items():
        critical = cfg.critical_thresholds.get(finding)
        if critical is not None and score >= critical and score >= thresholds.get(finding, critical):
            return Level.CRITICAL
        if finding in thresholds and score >= thresholds[finding]:
            level = Level.URGENT
    return level


def _fmt(finding: str, score: float, op: str, threshold: float) -> str:
    return f"{finding} {score:.2f} {op} {threshold:.2f}"


def _known(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> list[tuple[str, float, float]]:
    return [(f, s, thresholds[f]) for f, s in scores.items() if f in thresholds]


def _shortfall(x: tuple[str, float, float]) -> float:
    # threshold - score: the one ordering `explain` and `top_finding` share, so they agree on ties.
    return x[2] - x[1]


def explain(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> str:
    """The reason in words: every finding at or above threshold, highest margin first, else the closest miss."""
    known = _known(scores, thresholds)
    above = sorted((x for x in known if x[1] >= x[2]), key=_shortfall)
    if above:
        return ", ".join(_fmt(f, s, "≥", t) for f, s, t in above)
    if not known:
        return "no finding scored"
    f, s, t = min(known, key=_shortfall)
    return f"no finding above threshold (closest: {_fmt(f, s, '<', t)})"


def top_finding(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> tuple[str, float] | None:
    """(finding, score) that `explain` names first, so the worklist column and the reason agree."""
    known = _known(scores, thresholds)
    if not known:
        return None
    f, s, _ = min(known, key=_shortfall)
    return f, s


def _finding_list(found: Collection[str]) -> str | None:
    """``,f1,f2,`` in FINDING_NAMES order (unknown names of a foreign model last, by name), so
    the same set always gives the same string; None for none."""
    if not found:
        return None
    ordered = sorted(found, key=lambda f: (FINDING_INDEX.get(f, len(FINDING_INDEX)), f))
    return f",{','.join(ordered)},"


def flagged_findings(outcomes: Sequence[InstanceOutcome], thresholds: Mapping[str, float]) -> str | None:
    """``,f1,f2,`` over every scored instance (a finding on any film counts); None when none is flagged.

    Each instance counts at its own thresholds when it carries them (``InstanceOutcome.judged_at``),
    so the study's flags agree with the instances' stored flags.
    """
    return _finding_list(
        {
            f
            for o in outcomes
            if o.outcome is StudyState.SCORED
            for f, on in flags_for(o.scores, o.judged_at(thresholds)).items()
            if on
        }
    )


def decide(
    outcomes: Sequence[InstanceOutcome],
    thresholds: Mapping[str, float],
    cfg: TriageConfig,
    steering: Collection[str] | None = None,
    steering_by_population: Mapping[str, Collection[str]] | None = None,
) -> Decision:
    """The study's final state and priority from its instances' outcomes.

    Each scored instance is judged at its own thresholds when it carries them (its population's
    operating point), else at `thresholds`: a study with a child's and an adult's film judges
    each film as its own flags were judged.  Only steering findings set the level and the top
    finding: those of the instance's population in `steering_by_population` when given (a
    finding may have strong evidence in children and weak in adults), else `steering`
    (default: all); the others are still flagged (``flagged_findings``) and named in the
    reason as informational.

    Scored if any instance was scored (the study's level is its most urgent instance's);
    otherwise failed if any instance failed, else ineligible.  Both of the latter are
    ROUTINE and AI_UNAVAILABLE, never dropped.
    """
    scored = [o for o in outcomes if o.outcome is StudyState.SCORED]
    if not scored:
        failed = [o for o in outcomes if o.outcome is StudyState.FAILED]
        pick = failed or [o for o in outcomes if o.outcome is StudyState.INELIGIBLE]
        state = StudyState.FAILED if failed else StudyState.INELIGIBLE
        reason = "; ".join(dict.fromkeys(o.reason or state for o in pick)) or "no instance to score"
        return Decision(state, reason, Level.ROUTINE, Level.ROUTINE, f"{AI_UNAVAILABLE} ({reason})", AI_UNAVAILABLE)

    def steer_of(o: InstanceOutcome) -> dict[str, float]:
        allowed = steering
        if steering_by_population is not None:
            allowed = steering_by_population.get(o.population or ADULT, steering)
        return {f: t for f, t in o.judged_at(thresholds).items() if allowed is None or f in allowed}

    def rank(o: InstanceOutcome) -> tuple[Level, float]:
        steer = steer_of(o)
        return instance_level(o.scores, steer, cfg), -_margin(o.scores, steer)

    best = min(scored, key=rank)
    steer = steer_of(best)
    level = instance_level(best.scores, steer, cfg)
    words = f"{level.name.lower()}: {explain(best.scores, steer)}"
    info = [(f, s, t) for f, s, t in _known(best.scores, best.judged_at(thresholds)) if f not in steer and s >= t]
    if info:
        words += "; informational, not steering: " + ", ".join(_fmt(f, s, "≥", t) for f, s, t in info)
    top_name, top_score = top_finding(best.scores, steer) or (None, None)
    flagged = flagged_findings(scored, thresholds)
    steering_flagged = _finding_list({f for o in scored for f, on in flags_for(o.scores, steer_of(o)).items() if on})
    # Silent mode stores ROUTINE as the priority but still records the model's opinion.
    priority, reason = (Level.ROUTINE, f"silent mode, model says {words}") if cfg.silent_mode else (level, words)
    return Decision(
        StudyState.SCORED, None, priority, level, reason, None,
        top_finding=top_name, top_score=top_score, flagged_findings=flagged,
        steering_findings=steering_flagged or ",",
    )  # fmt: skip


def _margin(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> float:
    return max((s - thresholds[f] for f, s in scores.items() if f in thresholds), default=float("-inf"))


# --------------------------------------------------------------------------- worklist order


def _cap(cfg: TriageConfig, level: int) -> timedelta | None:
    minutes = cfg.escalate_after_min.get(Level(level).name.lower()) if level in (1, 2) else None
    return timedelta(minutes=minutes) if minutes is not None else None


def effective_priority(priority: int | None, received_at: datetime, now: datetime, cfg: TriageConfig) -> int:
    """Stored priority (NULL = ROUTINE), one level higher once the study waited past its level's cap."""
    level = Level.ROUTINE if priority is None else int(priority)
    cap = _cap(cfg, level)
    if cap is not None and now - received_at > cap:
        return max(Level.CRITICAL, level - 1)
    return level


def sort_key(priority: int | None, received_at: datetime, now: datetime, cfg: TriageConfig) -> tuple[int, datetime]:
    """Worklist order for in-memory lists: effective priority, then oldest first."""
    return effective_priority(priority, received_at, now, cfg), received_at


def effective_priority_sql(now: datetime, cfg: TriageConfig) -> ColumnElement[Any]:
    """``effective_priority`` as a SQL expression over Study (SQLite and PostgreSQL alike)."""
    stored = func.coalesce(Study.priority, int(Level.ROUTINE))
    whens = []
    for level in (Level.URGENT, Level.ROUTINE):
        cap = _cap(cfg, level)
        if cap is not None:
            whens.append((and_(stored == int(level), Study.received_at < now - cap), int(level) - 1))
    return case(*whens, else_=stored) if whens else stored


def worklist_order(cfg: TriageConfig, now: datetime) -> list[ColumnElement[Any]]:
    """ORDER BY clauses for the worklist: ``select(Study).order_by(*worklist_order(settings.triage, now))``."""
    return [effective_priority_sql(now, cfg), Study.received_at.asc(), Study.id.asc()]


def priority_segments(cfg: TriageConfig, now: datetime) -> list[tuple[int, ColumnElement[bool]]]:
    """The worklist order as index ranges: (effective level, condition on Study) pairs.

    Each condition is a range of the index (priority, received_at) whose rows all share one
    effective level, so a page is read as a few index range scans merged by (level,
    received_at) instead of sorting the table on ``effective_priority_sql``.  The pairs
    partition every study exactly once (NULL priority counts as ROUTINE); tests check the
    order they give equals ``sort_key``.
    """
    segments: list[tuple[int, ColumnElement[bool]]] = []
    for stored in (Level.CRITICAL, Level.URGENT, Level.ROUTINE, None):
        level = Level.ROUTINE if stored is None else stored
        cond = Study.priority.is_(None) if stored is None else Study.priority == int(stored)
        cap = _cap(cfg, level)
        if cap is None or level == Level.CRITICAL:
            segments.append((int(level), cond))
            continue
        segments.append((int(level) - 1, and_(cond, Study.received_at < now - cap)))
        segments.append((int(level), and_(cond, Study.received_at >= now - cap)))
    return segments
