"""The admin page and API: effective configuration, the model's operating points, queues, workers."""

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session, sessionmaker

from db.models import utcnow
from db.overrides import current_overrides, history
from models.card import ModelCard
from models.operating_points import ADULT, PAEDIATRIC
from models.registry import resolve_model_path
from settings import Settings, effective_config
from triage.operating import card_points, card_steering, steering_reasons
from worklist import health, queries
from worklist.deps import Admin, Db, page, site_settings_of
from worklist.routers.site_settings import override_dict

router = APIRouter()


def _model_status(settings: Settings) -> dict[str, Any]:
    """The shipped model's thresholds and steering at this site, or why they cannot be shown."""
    try:
        card = ModelCard.load(resolve_model_path(settings=settings).parent / "card.json")
        points = card_points(card, settings)
        return {
            "ref": card.ref,
            "thresholds": points[ADULT],
            "steering": sorted(card_steering(card, settings)),
            "steering_paediatric": sorted(card_steering(card, settings, PAEDIATRIC)),
            "steering_reasons": steering_reasons(card, settings),
            "paediatric_thresholds": points[PAEDIATRIC],
        }
    except Exception as exc:  # noqa: BLE001 - the page must show the rest when the card is missing
        return {"ref": None, "error": f"{type(exc).__name__}: {exc}", "thresholds": dict(settings.triage.thresholds)}


def admin_status(request: Request, session: Session) -> dict[str, Any]:
    settings = site_settings_of(request, session)
    factory: sessionmaker[Session] = request.app.state.factory
    now = utcnow()
    status = health.health(settings, factory, now)
    return {
        "config": effective_config(settings),
        "model": _model_status(settings),
        "health": status,
        "queues": status["checks"]["broker"].get("queues", {}),
        "workers": health.workers(session, now, settings.web.worker_stale_s),
        "studies": queries.counts_by_state(session),
        "latest_failures": queries.latest_failures(session),
        "failed_exports": queries.failed_exports(session),
        "overrides": _overrides(session),
    }


def _overrides(session: Session) -> dict[str, Any]:
    """Current overrides, the newest changes, and per setting the one change that may be rolled back."""
    rows = history(session)  # newest first
    newest: dict[str, int] = {}
    for row in rows:
        newest.setdefault(row.key, row.id)
    return {"current": current_overrides(session), "history": [override_dict(r) for r in rows], "newest": newest}


@router.get("/admin", response_class=HTMLResponse, include_in_schema=False)
def admin_page(request: Request, session: Db, user: Admin) -> HTMLResponse:
    data = admin_status(request, session)
    return page(request, "admin.html", user=user, a=data, config_json=json.dumps(data["config"], indent=2))


@router.get("/api/admin/status", tags=["admin"])
def api_admin(request: Request, session: Db, user: Admin) -> dict[str, Any]:
    """Effective configuration (secrets masked), queue depths, workers, counts, latest failures."""
    return admin_status(request, session)
