"""Worklist and study queries: data in (filters, now, policy), rows out.

The order is the triage policy's (triage/policy.py): effective priority, then waiting time.
Effective priority depends on *now* (a study rises a level once it has waited past its
level's cap), so a plain ``ORDER BY CASE ...`` would sort every row of the table for every
page.  Instead each (stored priority, waited past the cap or not) pair is a range of the
index ``(priority, received_at, id)`` with a constant effective level
(``triage.policy.priority_segments``); each range is read in index order with the page's
LIMIT and the few resulting rows are merged.  A page therefore costs a handful of short
index range scans whatever the size of the table (bench/worklist shows the plans).

By default read studies fall below everything still to be read (``WorklistOrder``): the
ranges are then split once more by read state, along ``(read_state, priority, received_at, id)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, Select, func, literal, or_, select, union_all
from sqlalchemy.orm import Session

from db.models import (
    PENDING_STATES,
    AiState,
    Export,
    ExportState,
    Instance,
    InstanceResult,
    ReadState,
    Series,
    StateTransition,
    Study,
    StudyState,
    ai_state_of,
)
from db.truth import truth_of
from models.findings import FINDING_NAMES
from settings import TriageConfig, WebConfig
from triage.policy import AI_UNAVAILABLE, Level, priority_segments
from worklist.reasons import plain_reason

COUNT_CAP = 10_000
MAX_PAGE_SIZE = 200


class PriorityName(enum.StrEnum):
    CRITICAL = "critical"
    URGENT = "urgent"
    ROUTINE = "routine"


class WorklistOrder(enum.StrEnum):
    """``unread_first``: read studies fall below everything still to be read (the default a
    radiologist works from); ``priority``: triage order alone, read or not."""

    UNREAD_FIRST = "unread_first"
    PRIORITY = "priority"


class WorklistQuery(BaseModel):
    """Filters and paging, shared by the page and the API (bad values answer 422, never 500)."""

    model_config = ConfigDict(extra="forbid")

    priority: list[PriorityName] = Field(default_factory=list, description="effective priority (after escalation)")
    finding: list[str] = Field(default_factory=list, description="studies flagged for any of these findings")
    ai_state: list[AiState] = Field(default_factory=list)
    read_state: list[ReadState] = Field(default_factory=list)
    calling_ae: Annotated[str | None, Field(max_length=16, description="source AE title")] = None
    date_from: Annotated[date | None, Field(description="study date, inclusive (YYYY-MM-DD)")] = None
    date_to: Annotated[date | None, Field(description="study date, inclusive (YYYY-MM-DD)")] = None
    order: WorklistOrder = WorklistOrder.UNREAD_FIRST
    page: Annotated[int, Field(ge=1, le=100_000)] = 1
    page_size: Annotated[int | None, Field(ge=1, le=MAX_PAGE_SIZE)] = None

    @field_validator("date_from", "date_to", mode="before")
    @classmethod
    def _dicom_date(cls, v: Any) -> Any:
        """Accept DICOM's YYYYMMDD as well as ISO YYYY-MM-DD (never a Unix timestamp)."""
        if isinstance(v, str) and len(v) == 8 and v.isdigit():
            return f"{v[:4]}-{v[4:6]}-{v[6:]}"
        if isinstance(v, str) and v.isdigit():
            raise ValueError("use YYYY-MM-DD or YYYYMMDD")
        return v

    @field_validator("finding")
    @classmethod
    def _known_findings(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in FINDING_NAMES]
        if unknown:
            raise ValueError(f"unknown finding {unknown}; choose from {list(FINDING_NAMES)}")
        return v

    @field_validator("date_from", "date_to", mode="before")
    @classmethod
    def _empty_date(cls, v: Any) -> Any:
        # The filter form submits its empty date inputs as "date_from=&date_to=": no date, not a 400.
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("calling_ae")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        v = (v or "").strip()
        return v or None

    def levels(self) -> set[int]:
        return {int(Level[p.name]) for p in self.priority} or {int(lv) for lv in Level}

    def as_params(self) -> list[tuple[str, str]]:
        """Query-string pairs of the filters and page size (for links that keep them), without the page."""
        data = self.model_dump(mode="json", exclude={"page"}, exclude_defaults=True)
        return [(k, str(v)) for k, vs in data.items() for v in (vs if isinstance(vs, list) else [vs])]


def _filters(q: WorklistQuery) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if q.finding:
        where.append(or_(*(Study.flagged_findings.like(f"%,{f},%") for f in q.finding)))
    if q.ai_state:
        states: list[str] = []
        for s in q.ai_state:
            states += [p.value for p in PENDING_STATES] if s is AiState.PENDING else [s.value]
        where.append(Study.state.in_(states))
    if q.read_state:
        where.append(Study.read_state.in_([s.value for s in q.read_state]))
    if q.calling_ae:
        where.append(Study.calling_ae == q.calling_ae)
    if q.date_from:
        where.append(Study.study_date >= q.date_from.strftime("%Y%m%d"))
    if q.date_to:
        where.append(Study.study_date <= q.date_to.strftime("%Y%m%d"))
    return where


@dataclass(frozen=True)
class OrderedIds:
    ids: list[int]
    levels: dict[int, int]  # study id -> effective priority
    total: int
    more: bool = False  # True when more than `total` (= COUNT_CAP) studies match


def _read_groups(q: WorklistQuery) -> list[tuple[int, ColumnElement[bool] | None]]:
    """(sort group, condition) pairs: with unread first, one range per read state (each an
    index range of ``ix_study_read_state_priority``), read studies in the last group."""
    if q.order is WorklistOrder.PRIORITY:
        return [(0, None)]
    states = q.read_state or list(ReadState)
    return [(1 if s is ReadState.READ else 0, Study.read_state == s.value) for s in ReadState if s in states]


def page_statement(q: WorklistQuery, cfg: TriageConfig, now: datetime, page_size: int) -> Select[Any] | None:
    """The SELECT of one page's (id, effective level) in worklist order; None when no level is asked for.

    Built without executing, so bench/worklist can EXPLAIN exactly what ``ordered_ids`` runs.
    """
    where = _filters(q)
    segments = [(lv, cond) for lv, cond in priority_segments(cfg, now) if lv in q.levels()]
    if not segments:
        return None
    offset = (q.page - 1) * page_size
    branches = []
    for group, read_cond in _read_groups(q):
        for level, cond in segments:
            conds = [cond, *where] if read_cond is None else [read_cond, cond, *where]
            inner = (
                select(
                    Study.id.label("id"),
                    literal(group).label("grp"),
                    literal(level).label("eff"),
                    Study.received_at.label("received_at"),
                )
                .where(*conds)
                .order_by(Study.received_at, Study.id)
                .limit(offset + page_size)
                .subquery()
            )
            branches.append(select(inner.c.id, inner.c.grp, inner.c.eff, inner.c.received_at))
    merged = union_all(*branches).subquery()
    return (
        select(merged.c.id, merged.c.eff)
        .order_by(merged.c.grp, merged.c.eff, merged.c.received_at, merged.c.id)
        .offset(offset)
        .limit(page_size)
    )


def total_statement(q: WorklistQuery, cfg: TriageConfig, now: datetime) -> Select[Any] | None:
    """The SELECT count(*) of every study matching the filters (all pages); None when no level is asked for."""
    where = _filters(q)
    all_segments = priority_segments(cfg, now)
    segments = [(lv, cond) for lv, cond in all_segments if lv in q.levels()]
    if not segments:
        return None
    total_where = [*where] if len(segments) == len(all_segments) else [or_(*(c for _, c in segments)), *where]
    # Counted up to COUNT_CAP + 1 rows only: an exact count of a year of studies is a scan of
    # the whole table on every page and every refresh, and "10,000+" says as much to a reader.
    capped = select(Study.id).where(*total_where).limit(COUNT_CAP + 1).subquery()
    return select(func.count()).select_from(capped)


def ordered_ids(session: Session, q: WorklistQuery, cfg: TriageConfig, now: datetime, page_size: int) -> OrderedIds:
    """The study ids of one page in worklist order, and how many studies match in all."""
    stmt, count = page_statement(q, cfg, now, page_size), total_statement(q, cfg, now)
    if stmt is None or count is None:
        return OrderedIds([], {}, 0)
    rows = session.execute(stmt).all()
    total = int(session.scalar(count) or 0)
    return OrderedIds(
        [int(r[0]) for r in rows], {int(r[0]): int(r[1]) for r in rows}, min(total, COUNT_CAP), total > COUNT_CAP
    )


# --------------------------------------------------------------------------- presentation


def person_name(name: str | None) -> str | None:
    """DICOM PN "DOE^JOHN^^DR" -> "DOE, JOHN" as people read it (alphabetic group only)."""
    if not name:
        return name
    parts = [p.strip() for p in name.split("=")[0].split("^")]
    family, given = [*parts, "", ""][:2]
    return ", ".join(p for p in (family, " ".join(x for x in [given, *parts[2:3]] if x)) if p) or name


def mask_name(name: str | None) -> str | None:
    """DICOM PN "DOE^JOHN" -> "D*** J***": enough to tell two patients apart at a glance."""
    if not name:
        return name
    parts = [p for p in name.replace("=", "^").split("^") if p.strip()][:2]
    return " ".join(f"{p.strip()[0]}***" for p in parts) or "***"


def mask_id(patient_id: str | None) -> str | None:
    if not patient_id:
        return patient_id
    return "***" + patient_id[-2:] if len(patient_id) > 4 else "***"


def waiting(received_at: datetime, now: datetime) -> str:
    minutes = max(0, int((now - received_at).total_seconds() // 60))
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def _series_summary(session: Session, study_ids: list[int]) -> dict[int, tuple[str | None, str | None]]:
    """(modalities, view positions) per study, e.g. ("CR", "PA, LL")."""
    out: dict[int, tuple[set[str], set[str]]] = {}
    if not study_ids:
        return {}
    for sid, modality, view in session.execute(
        select(Series.study_id, Series.modality, Series.view_position).where(Series.study_id.in_(study_ids))
    ):
        mods, views = out.setdefault(int(sid), (set(), set()))
        if modality:
            mods.add(str(modality))
        if view:
            views.add(str(view))
    return {k: (", ".join(sorted(m)) or None, ", ".join(sorted(v)) or None) for k, (m, v) in out.items()}


def study_row(
    study: Study,
    effective: int,
    series: tuple[str | None, str | None],
    now: datetime,
    web: WebConfig,
) -> dict[str, Any]:
    """One worklist row as plain data: what the page renders and the API returns."""
    ai = ai_state_of(str(study.state))
    new = (
        effective <= Level.URGENT
        and study.finished_at is not None
        and now - study.finished_at < timedelta(minutes=web.new_marker_min)
        and study.read_state == ReadState.UNREAD
    )
    stored = Level.ROUTINE if study.priority is None else Level(study.priority)
    return {
        "study_uid": study.study_uid,
        "priority": Level(effective).name.lower(),
        "priority_level": int(effective),
        "escalated": int(effective) < int(stored),
        # A failed or ineligible study's stored reason quotes the technical cause: in words here too.
        "priority_reason": (
            f"{AI_UNAVAILABLE} ({plain_reason(ai.value, study.state_reason)})"
            if ai in (AiState.FAILED, AiState.INELIGIBLE)
            else study.priority_reason
        ),
        "received_at": study.received_at.isoformat(),
        "waiting": waiting(study.received_at, now),
        "waiting_s": int((now - study.received_at).total_seconds()),
        "patient_name": mask_name(study.patient_name) if web.mask_patient_identity else study.patient_name,
        "patient_id": mask_id(study.patient_id) if web.mask_patient_identity else study.patient_id,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "description": study.description,
        "modality": series[0],
        "view": series[1],
        "top_finding": study.top_finding,
        "top_score": study.top_score,
        "flagged_findings": [f for f in (study.flagged_findings or "").split(",") if f],
        # The flagged findings that steer the priority: the only ones a row names (NULL for
        # studies scored before they were recorded: the top finding alone, which always steers).
        "steering_findings": [f for f in (study.steering_findings or "").split(",") if f],
        "steering_known": study.steering_findings is not None,
        "ai_state": ai.value,
        # In words for everyone; the stored technical reason only for admins (worklist.reasons.for_user).
        "ai_reason": plain_reason(ai.value, study.state_reason),
        "ai_detail": (study.state_reason or AI_UNAVAILABLE if ai in (AiState.FAILED, AiState.INELIGIBLE) else None),
        "pipeline_state": str(study.state),
        "read_state": str(study.read_state),
        "read_by": study.read_by,
        "calling_ae": study.calling_ae,
        "new": bool(new),
        "model": study.model_ref,
    }


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    total: int
    page: int
    page_size: int
    more: bool = False  # more than `total` studies match (the count stops at COUNT_CAP)

    @property
    def pages(self) -> int:
        counted = max(1, -(-self.total // self.page_size))
        # Past the counted pages, a full page may have a next one.
        if not self.more:
            return counted
        return max(counted, self.page + 1 if len(self.rows) == self.page_size else self.page)

    @property
    def total_label(self) -> str:
        return f"{self.total:,}+" if self.more else f"{self.total:,}"

    @property
    def count_label(self) -> str:
        """ "1 study", "2 studies", "10,000+ studies"."""
        return f"{self.total_label} {'study' if self.total == 1 and not self.more else 'studies'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_exact": not self.more,
            "total": self.total,
            "page": self.page,
            "page_size": self.page_size,
            "pages": self.pages,
            "items": self.rows,
        }


def worklist_page(session: Session, q: WorklistQuery, cfg: TriageConfig, web: WebConfig, now: datetime) -> Page:
    page_size = q.page_size or web.page_size
    found = ordered_ids(session, q, cfg, now, page_size)
    studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(found.ids)))} if found.ids else {}
    series = _series_summary(session, found.ids)
    rows = [study_row(studies[i], found.levels[i], series.get(i, (None, None)), now, web) for i in found.ids]
    return Page(rows, found.total, q.page, page_size, found.more)


# --------------------------------------------------------------------------- one study


def find_study(session: Session, study_uid: str) -> Study | None:
    return session.scalar(select(Study).where(Study.study_uid == study_uid))


def study_detail(session: Session, study: Study, cfg: TriageConfig, web: WebConfig, now: datetime) -> dict[str, Any]:
    """The study page's data: the worklist row plus instances, their results, timings and history."""
    from triage.policy import effective_priority

    effective = effective_priority(study.priority, study.received_at, now, cfg)
    row = study_row(study, effective, _series_summary(session, [study.id]).get(study.id, (None, None)), now, web)
    results = {
        r.instance_id: r
        for r in session.scalars(
            select(InstanceResult).where(
                InstanceResult.study_id == study.id,
                *([InstanceResult.model_ref == study.model_ref] if study.model_ref else []),
            )
        )
    }
    instances = []
    for series in sorted(study.series, key=lambda s: (s.series_number or 0, s.id)):
        latest: dict[str, Any] = {}
        for inst in sorted(series.instances, key=lambda i: (i.instance_number or 0, i.version)):
            latest[inst.sop_instance_uid] = inst  # the newest version of each SOP Instance UID wins
        for inst in latest.values():
            res = results.get(inst.id)
            instances.append(
                {
                    "sop_instance_uid": inst.sop_instance_uid,
                    "series_uid": series.series_uid,
                    "modality": series.modality,
                    "view": series.view_position,
                    "body_part": series.body_part,
                    "instance_number": inst.instance_number,
                    "version": inst.version,
                    "received_at": inst.received_at.isoformat(),
                    "result": None
                    if res is None
                    else {
                        "outcome": res.outcome,
                        "reason": plain_reason(res.outcome, res.reason),
                        "detail": res.reason,
                        "scores": res.scores,
                        "thresholds": res.thresholds,
                        "flags": res.flags,
                        "heatmaps": sorted((res.heatmaps or {}).keys()),
                        "model": res.model_ref,
                        "pipeline_version": res.pipeline_version,
                        "timings": {
                            "received": _iso(res.received_at),
                            "queued": _iso(res.queued_at),
                            "started": _iso(res.started_at),
                            "finished": _iso(res.finished_at),
                            "processing_s": round((res.finished_at - res.started_at).total_seconds(), 3),
                        },
                    },
                }
            )
    history = [
        {
            "from": t.from_state,
            "to": t.to_state,
            # Failed and ineligible transitions quote the technical cause: in words, the cause for admins.
            "reason": plain_reason(str(t.to_state), t.reason) or t.reason,
            "detail": t.reason if plain_reason(str(t.to_state), t.reason) else None,
            "at": t.at.isoformat(),
        }
        for t in session.scalars(
            select(StateTransition).where(StateTransition.study_id == study.id).order_by(StateTransition.id)
        )
    ]
    return {
        **row,
        "state_reason": study.state_reason,
        "timings": {
            "received": _iso(study.received_at),
            "queued": _iso(study.queued_at),
            "processing": _iso(study.processing_at),
            "finished": _iso(study.finished_at),
        },
        "read_state_at": _iso(study.read_state_at),
        "instances": instances,
        "history": history,
        "exports": study_exports(session, study.id),
        "truth": study_truth(session, study.id),
    }


def study_truth(session: Session, study_id: int) -> dict[str, dict[str, Any]]:
    """Per finding the reference label recorded for the study, with its source, who and when."""
    return {
        f: {"label": str(t.label), "source": t.source, "by": t.recorded_by, "at": t.recorded_at.isoformat()}
        for f, t in truth_of(session, study_id).items()
    }


def _export_dict(e: Export) -> dict[str, Any]:
    return {
        "id": e.id,
        "destination": e.destination,
        "kind": e.kind,
        "state": str(e.state),
        "attempts": e.attempts,
        "last_error": e.last_error,
        "model": e.model_ref,
        "generation": e.generation,
        "sent_at": _iso(e.sent_at),
        "updated_at": _iso(e.updated_at),
        "next_attempt_at": _iso(e.next_attempt_at) if e.state == ExportState.PENDING else None,
        "objects": list(e.objects or []),
        "retryable": e.state in (ExportState.FAILED, ExportState.PENDING),
    }


def study_exports(session: Session, study_id: int) -> list[dict[str, Any]]:
    """Each destination's export of each result of the study, newest result first."""
    rows = session.scalars(
        select(Export).where(Export.study_id == study_id).order_by(Export.generation.desc(), Export.destination)
    )
    return [_export_dict(e) for e in rows]


def failed_exports(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    """The newest export_failed rows with their reasons (no patient data: UIDs, destination, error)."""
    rows = session.execute(
        select(Export, Study.study_uid)
        .join(Study, Study.id == Export.study_id)
        .where(Export.state == ExportState.FAILED)
        .order_by(Export.updated_at.desc())
        .limit(limit)
    ).all()
    return [{**_export_dict(e), "study_uid": uid} for e, uid in rows]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def set_read_state(session: Session, study: Study, state: ReadState, username: str, now: datetime) -> None:
    study.read_state = state
    study.read_by = username if state is not ReadState.UNREAD else None
    study.read_state_at = now


def instance_for(
    session: Session, study: Study, sop_instance_uid: str
) -> tuple[Instance, InstanceResult | None] | None:
    """(newest Instance of that UID in this study, its result for the study's model) or None."""
    inst = session.scalar(
        select(Instance)
        .join(Series)
        .where(Series.study_id == study.id, Instance.sop_instance_uid == sop_instance_uid)
        .order_by(Instance.version.desc())
        .limit(1)
    )
    if inst is None:
        return None
    res = session.scalar(
        select(InstanceResult).where(
            InstanceResult.instance_id == inst.id,
            *([InstanceResult.model_ref == study.model_ref] if study.model_ref else []),
        )
    )
    return inst, res


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
    counts = {s.value: 0 for s in StudyState}
    counts.update({str(s): int(n) for s, n in rows})
    return counts


def latest_failures(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    """The newest failed or ineligible studies with their reasons (no patient data)."""
    stmt = (
        select(Study.study_uid, Study.state, Study.state_reason, Study.state_changed_at, Study.calling_ae)
        .where(Study.state.in_([StudyState.FAILED.value, StudyState.INELIGIBLE.value]))
        .order_by(Study.state_changed_at.desc())
        .limit(limit)
    )
    return [
        {"study_uid": uid, "state": str(st), "reason": reason, "at": at.isoformat(), "calling_ae": ae}
        for uid, st, reason, at, ae in session.execute(stmt)
    ]
