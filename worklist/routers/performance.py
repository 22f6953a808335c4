"""The admin's Performance page: how the model does at this site over a chosen period.

Per finding: studies scored, flag rate, score distribution against the model card's
validation distribution (PSI, with the drift alarm of ``monitoring.psi_alarm``) and, where
radiologists recorded the truth, sensitivity, specificity, PPV and AUC with bootstrap
intervals, a ROC and a calibration plot drawn by the same code as ``evaluate``.  Plus the time
to priority, the final states and the export failures of the period.
"""

import base64
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from db.models import Study, utcnow
from models.card import ModelCard
from models.findings import FINDING_NAMES
from models.registry import resolve_model_path
from monitoring.performance import Filters, compare_models, label_matrix, scored_studies, site_performance
from settings import Settings
from worklist.deps import Admin, Db, page, site_settings_of

router = APIRouter()


def _date(value: str | None, default: datetime, name: str) -> datetime:
    if not value:
        return default
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise HTTPException(400, f"{name} must be a date YYYY-MM-DD") from None


def _filters(
    settings: Settings, since: str | None, until: str | None, calling_ae: str | None, model: str | None
) -> Filters:
    now = utcnow()
    start = _date(since, now - timedelta(days=settings.monitoring.period_days), "since")
    end = _date(until, now, "until")
    if until:
        end += timedelta(days=1)  # the whole of that day
    if end <= start:
        raise HTTPException(400, "until must be after since")
    return Filters(start, end, calling_ae or None, model or None)


def _reference(settings: Settings) -> dict[str, dict[str, list[int]]]:
    try:
        return ModelCard.load(resolve_model_path(settings=settings).parent / "card.json").score_reference
    except Exception:  # noqa: BLE001 - no card: the page says there is no reference
        return {}


def _plots(session: Session, f: Filters) -> dict[str, str]:
    """ROC and calibration PNGs as data: URIs, when at least one finding has both classes labelled."""
    from models import plots

    y, p = label_matrix(scored_studies(session, f))
    if not any(len({v for v in y[:, j] if v >= 0}) == 2 for j in range(y.shape[1])):
        return {}
    metrics: dict[str, Any] = {}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, draw in (
            ("roc", lambda path: plots.plot_roc(y, p, FINDING_NAMES, metrics, path)),
            ("calibration", lambda path: plots.plot_calibration(y, p, FINDING_NAMES, path)),
        ):
            path = draw(Path(tmp) / f"{name}.png")
            out[name] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return out


def _card_ref(path: str | None, settings: Settings) -> str | None:
    try:
        return ModelCard.load(resolve_model_path(path, settings=None if path else settings).parent / "card.json").ref
    except Exception:  # noqa: BLE001 - no card, no comparison
        return None


def _performance(session: Session, f: Filters, settings: Settings) -> dict[str, Any]:
    cfg = settings.monitoring
    perf = site_performance(
        session, f, _reference(settings), cfg.psi_alarm, cfg.bootstrap, min_drift_studies=cfg.min_drift_studies
    )
    perf["shadow"] = None
    if settings.model.shadow_path:
        primary, shadow = f.model_ref or _card_ref(None, settings), _card_ref(settings.model.shadow_path, settings)
        if primary and shadow and primary != shadow:
            perf["shadow"] = compare_models(session, f, primary, shadow, cfg.bootstrap)
    return perf


def _options(session: Session) -> dict[str, list[str]]:
    aes = sorted({a for (a,) in session.execute(select(Study.calling_ae).distinct())})
    models = sorted({m for (m,) in session.execute(select(Study.model_ref).distinct()) if m})
    return {"calling_aes": aes, "models": models}


Since = Annotated[str | None, Query(description="first day, YYYY-MM-DD (default: monitoring.period_days ago)")]
Until = Annotated[str | None, Query(description="last day, YYYY-MM-DD (default: today)")]


@router.get("/admin/performance", response_class=HTMLResponse, include_in_schema=False)
def performance_page(
    request: Request, session: Db, user: Admin, since: Since = None, until: Until = None,
    calling_ae: str | None = None, model: str | None = None,
) -> HTMLResponse:  # fmt: skip
    settings = site_settings_of(request, session)  # a promoted model is the primary here too
    f = _filters(settings, since, until, calling_ae, model)
    perf = _performance(session, f, settings)
    form = {"since": f.since.date().isoformat(), "until": (f.until - timedelta(days=1)).date().isoformat()}
    return page(
        request, "performance.html", user=user, perf=perf, plots=_plots(session, f), form=form,
        options=_options(session), chosen={"calling_ae": calling_ae or "", "model": model or ""},
        psi_alarm=settings.monitoring.psi_alarm, min_drift=settings.monitoring.min_drift_studies,
        edges=[f"{b / 10:.1f}" for b in range(11)],
    )  # fmt: skip


@router.get("/api/admin/performance", tags=["admin"])
def api_performance(
    request: Request, session: Db, user: Admin, since: Since = None, until: Until = None,
    calling_ae: str | None = None, model: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Per finding: studies, flag rate, score histogram vs the card's (PSI, drift alarm) and, with truth,
    sensitivity, specificity, PPV and AUC with 95 % bootstrap intervals; per calling AE and model; operations."""
    settings = site_settings_of(request, session)  # a promoted model is the primary here too
    f = _filters(settings, since, until, calling_ae, model)
    return _performance(session, f, settings)
