"""Triage policy: scores in, priority and worklist order out (data in, data out, no I/O).

Levels are small integers so the worklist can sort on them: CRITICAL (0) before URGENT (1)
before ROUTINE (2).  A study the AI could not score (failed, ineligible, not yet scored) is
ROUTINE and stays on the worklist, marked "AI unavailable – read as usual".

The worklist order is effective priority, then waiting time (oldest first).  The effective
priority escalates a study one level once it has waited longer than the cap of its level,
because ordering by priority alone makes the longest waits longer.  Silent mode records the
model's opinion (``ai_priority``) but stores ROUTINE as the priority, so the order stays by
time until a site has checked the model on its own data.

Issue 6's worklist calls ``worklist_order(settings.triage, now)`` (SQLAlchemy ORDER BY
clauses) or, for lists already in memory, ``sort_key``/``effective_priority``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func

from db.models import Study
from worker.config import TriageConfig

AI_UNAVAILABLE = "AI unavailable – read as usual"


class Level(enum.IntEnum):
    CRITICAL = 0
    URGENT = 1
    ROUTINE = 2


@dataclass(frozen=True)
class InstanceOutcome:
    """What the pipeline produced for one instance: scores (if scored) or why not."""

    sop_instance_uid: str
    outcome: str  # "scored" | "ineligible" | "failed"
    reason: str | None = None
    scores: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """Everything the worker stores on the study once it is final."""

    state: str  # "scored" | "ineligible" | "failed"
    reason: str | None  # state reason (why ineligible / failed)
    priority: int  # what the worklist sorts on
    ai_priority: int  # what the model alone says (== priority unless silent)
    priority_reason: str
    ai_state: str | None  # AI_UNAVAILABLE when nothing could be scored


def thresholds_for(card_thresholds: Mapping[str, float], cfg: TriageConfig) -> dict[str, float]:
    """The card's operating thresholds with the site's overrides on top."""
    return {**{k: float(v) for k, v in card_thresholds.items()}, **{k: float(v) for k, v in cfg.thresholds.items()}}


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


def explain(scores: Mapping[str, float], thresholds: Mapping[str, float]) -> str:
    """The reason in words: every finding at or above threshold, highest margin first, else the closest miss."""
    known = [(f, s, thresholds[f]) for f, s in scores.items() if f in thresholds]
    above = sorted((x for x in known if x[1] >= x[2]), key=lambda x: x[2] - x[1])
    if above:
        return ", ".join(_fmt(f, s, "≥", t) for f, s, t in above)
    if not known:
        return "no finding scored"
    f, s, t = min(known, key=lambda x: x[2] - x[1])
    return f"no finding above threshold (closest: {_fmt(f, s, '<', t)})"


def decide(outcomes: Sequence[InstanceOutcome], thresholds: Mapping[str, float], cfg: TriageConfig) -> Decision:
    """The study's final state and priority from its instances' outcomes.

    Scored if any instance was scored (the study's level is its most urgent instance's);
    otherwise failed if any instance failed, else ineligible.  Both of the latter are
    ROUTINE and AI_UNAVAILABLE, never dropped.
    """
    scored = [o for o in outcomes if o.outcome == "scored"]
    if not scored:
        failed = [o for o in outcomes if o.outcome == "failed"]
        pick = failed or [o for o in outcomes if o.outcome == "ineligible"]
        state = "failed" if failed else "ineligible"
        reason = "; ".join(dict.fromkeys(o.reason or state for o in pick)) or "no instance to score"
        return Decision(state, reason, Level.ROUTINE, Level.ROUTINE, f"{AI_UNAVAILABLE} ({reason})", AI_UNAVAILABLE)
    best = min(scored, key=lambda o: (instance_level(o.scores, thresholds, cfg), -_margin(o.scores, thresholds)))
    level = instance_level(best.scores, thresholds, cfg)
    words = f"{level.name.lower()}: {explain(best.scores, thresholds)}"
    if cfg.silent_mode:
        return Decision("scored", None, Level.ROUTINE, level, f"silent mode, model says {words}", None)
    return Decision("scored", None, level, level, words, None)


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
