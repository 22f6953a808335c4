"""Results on their way to the PACS and the RIS: an admin's "retry now", and the failed ones."""

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from broker import make_celery, publish_export
from db.exports import retry_now
from db.models import Export, Study, utcnow
from worklist import audit, queries
from worklist.deps import Admin, ApiCsrf, Db, check_csrf, settings_of
from worklist.security import CSRF_FIELD
from worklist.users import CurrentUser

router = APIRouter()


def _retry(request: Request, session: Session, export_id: int, user: CurrentUser) -> str:
    """Reset the export's attempts and queue it; the study's UID (for the redirect)."""
    export = session.get(Export, export_id)
    if export is None:
        raise HTTPException(404, "no such export")
    study = session.get(Study, export.study_id)
    assert study is not None  # the foreign key cascades
    if not retry_now(session, export_id):
        raise HTTPException(409, f"this export is {export.state}: only pending or failed exports can be retried")
    audit.record(session, user.username, "export_retry", utcnow(), study.study_uid, export.destination)
    session.commit()
    settings = settings_of(request)
    try:
        publish_export(make_celery(settings), settings, export_id)
    except Exception:  # noqa: BLE001 - the row is pending and due: the sweeper publishes it
        pass
    return study.study_uid


@router.post("/studies/{study_uid}/exports/{export_id}/retry", include_in_schema=False)
def retry_page(
    request: Request,
    session: Db,
    user: Admin,
    study_uid: str,
    export_id: int,
    csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
) -> Response:
    check_csrf(request, csrf_token_)
    uid = _retry(request, session, export_id, user)
    return RedirectResponse(f"/studies/{uid}#exports", status_code=303)


@router.post("/api/exports/{export_id}/retry", tags=["admin"], dependencies=[ApiCsrf])
def api_retry(request: Request, session: Db, user: Admin, export_id: int) -> dict[str, Any]:
    """Send a failed (or still pending) export again now, with a fresh attempt budget; audited."""
    uid = _retry(request, session, export_id, user)
    return {"id": export_id, "study_uid": uid, "state": "pending"}


@router.get("/api/exports/failed", tags=["admin"])
def api_failed(session: Db, user: Admin) -> list[dict[str, Any]]:
    """The newest exports that ran out of attempts, with the destination's last answer or error."""
    return queries.failed_exports(session)
