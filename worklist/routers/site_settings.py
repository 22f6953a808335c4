"""Audited site settings: an admin sets a finding's threshold (which makes it steer), returns it
to the card's, or switches silent mode, with the evidence; every change can be rolled back.

Stored append-only in ``site_override`` and in the audit trail; applied over the
configuration file by ``triage.site`` to the next batch the worker scores and to every page.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from db.models import SiteOverride, utcnow
from db.overrides import MODEL_PATH, SHADOW_PATH, THRESHOLD_PREFIX, current_overrides, history, newest_for
from db.overrides import change as record_change
from models.card import ModelCard
from models.registry import resolve_model_path
from settings import Settings
from triage.site import OverrideError, check_value
from worklist import audit
from worklist.deps import Admin, ApiCsrf, Db, check_csrf, site_settings_of
from worklist.security import CSRF_FIELD
from worklist.users import CurrentUser

router = APIRouter()


class OverrideChange(BaseModel):
    key: str
    value: bool | float | None
    evidence: str = Field(min_length=3, max_length=500)


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def override_dict(row: SiteOverride) -> dict[str, Any]:
    return {
        "id": row.id,
        "key": row.key,
        "value": row.value,
        "previous": row.previous,
        "set_by": row.set_by,
        "set_at": row.set_at.isoformat(),
        "evidence": row.evidence,
        "rolls_back": row.rolls_back,
    }


def _change(
    session: Session,
    key: str,
    value: Any,
    evidence: str,
    user: CurrentUser,
    rolls_back: int | None = None,
    commit: bool = True,
) -> SiteOverride:
    if key in (MODEL_PATH, SHADOW_PATH) and not evidence.startswith(("promotion of", "rollback of")):
        raise HTTPException(422, "the models change only by promoting the shadow model (Performance page)")
    try:
        value = check_value(key, value)
    except OverrideError as exc:
        raise HTTPException(422, str(exc)) from None
    evidence = evidence.strip()
    if len(evidence) < 3:
        raise HTTPException(422, "say what the change rests on (e.g. the site report's folder)")
    previous = current_overrides(session).get(key)
    now = utcnow()
    row = record_change(session, key, value, previous, user.username, evidence, now, rolls_back)
    what = f"rollback of #{rolls_back}: " if rolls_back else ""
    audit.record(session, user.username, "site_override", now, None,
                 f"{what}{key}: {_shown(previous)} -> {_shown(value)} (evidence: {evidence})"[:1000])  # fmt: skip
    if commit:
        session.commit()
    return row


def _rollback(session: Session, override_id: int, user: CurrentUser) -> SiteOverride:
    row = session.get(SiteOverride, override_id)
    if row is None:
        raise HTTPException(404, "no such change")
    newest = newest_for(session, row.key)
    if newest is None or newest.id != row.id:
        raise HTTPException(409, "only the newest change of a setting can be rolled back")
    return _change(session, row.key, row.previous, f"rollback of change #{row.id}", user, rolls_back=row.id)


def _form_value(key: str, raw: str) -> Any:
    raw = raw.strip().lower()
    if key == "silent_mode":
        return {"on": True, "true": True, "off": False, "false": False}.get(raw, raw)
    if raw in ("", "card"):
        return None
    try:
        return float(raw)
    except ValueError:
        return raw  # check_value refuses it with the reason


@router.post("/admin/overrides", include_in_schema=False)
def override_form(
    request: Request,
    session: Db,
    user: Admin,
    key: Annotated[str, Form()],
    value: Annotated[str, Form()] = "",
    evidence: Annotated[str, Form()] = "",
    csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
) -> Response:
    check_csrf(request, csrf_token_)
    _change(session, key, _form_value(key, value), evidence, user)
    return RedirectResponse("/admin#overrides", status_code=303)


@router.post("/admin/overrides/{override_id}/rollback", include_in_schema=False)
def rollback_form(
    request: Request,
    session: Db,
    user: Admin,
    override_id: int,
    csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
) -> Response:
    check_csrf(request, csrf_token_)
    _rollback(session, override_id, user)
    return RedirectResponse("/admin#overrides", status_code=303)


@router.get("/api/admin/overrides", tags=["admin"])
def api_overrides(session: Db, user: Admin) -> dict[str, Any]:
    """The site's current overrides over the configuration file, and the newest changes."""
    return {"current": current_overrides(session), "history": [override_dict(r) for r in history(session)]}


@router.post("/api/admin/overrides", tags=["admin"], dependencies=[ApiCsrf])
def api_change(session: Db, user: Admin, body: OverrideChange) -> dict[str, Any]:
    """Set `threshold:<finding>` (0-1; null returns to the card's) or `silent_mode` (true/false), with the evidence."""
    return override_dict(_change(session, body.key, body.value, body.evidence, user))


@router.post("/api/admin/overrides/{override_id}/rollback", tags=["admin"], dependencies=[ApiCsrf])
def api_rollback(session: Db, user: Admin, override_id: int) -> dict[str, Any]:
    """Undo the newest change of a setting (recorded as a change of its own)."""
    return override_dict(_rollback(session, override_id, user))


class Promotion(BaseModel):
    evidence: str = Field(min_length=3, max_length=500)


def _model_folder(path: str | None, settings: Settings) -> tuple[str, str]:
    """(folder, model ref) of a configured model, or 409 when its card cannot be read."""
    try:
        folder = resolve_model_path(path, settings=None if path else settings).parent
        return str(folder), ModelCard.load(folder / "card.json").ref
    except Exception as exc:  # noqa: BLE001 - a missing or broken model is the admin's to fix
        raise HTTPException(409, f"the model cannot be read: {type(exc).__name__}") from None


def _promote(request: Request, session: Session, evidence: str, user: CurrentUser) -> dict[str, Any]:
    settings = site_settings_of(request, session)
    if not settings.model.shadow_path:
        raise HTTPException(409, "no shadow model is configured (model.shadow_path)")
    shadow_folder, shadow_ref = _model_folder(settings.model.shadow_path, settings)
    primary_folder, primary_ref = _model_folder(settings.model.path, settings)
    note = f"promotion of {shadow_ref} over {primary_ref}: {evidence.strip()}"
    _change(session, MODEL_PATH, shadow_folder, note, user, commit=False)
    _change(session, SHADOW_PATH, primary_folder, note, user, commit=False)
    # Site thresholds were chosen for the previous model's scores: they do not carry over.
    for key in [k for k in current_overrides(session) if k.startswith(THRESHOLD_PREFIX)]:
        _change(session, key, None, f"cleared by the {note}", user, commit=False)
    session.commit()
    return {"primary": shadow_ref, "shadow": primary_ref}


@router.post("/api/admin/promote-shadow", tags=["admin"], dependencies=[ApiCsrf])
def api_promote(request: Request, session: Db, user: Admin, body: Promotion) -> dict[str, Any]:
    """Make the shadow model the primary (and the primary the shadow) for the next batch, audited;
    site thresholds set for the previous model are cleared."""
    return _promote(request, session, body.evidence, user)


@router.post("/admin/promote-shadow", include_in_schema=False)
def promote_form(
    request: Request,
    session: Db,
    user: Admin,
    evidence: Annotated[str, Form()] = "",
    csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
) -> Response:
    check_csrf(request, csrf_token_)
    if len(evidence.strip()) < 3:
        raise HTTPException(422, "say what the promotion rests on (e.g. the Performance page's period)")
    _promote(request, session, evidence, user)
    return RedirectResponse("/admin/performance#shadow", status_code=303)
