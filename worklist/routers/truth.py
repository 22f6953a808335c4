"""Ground truth from the radiologist who read the study: per finding present, absent or uncertain.

Optional, one click each on the study page (or the API); who and when are stored with the
label and every change is in the audit trail.  This is what the site's performance figures
are measured against.
"""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from db.models import Study, TruthLabel, utcnow
from db.truth import set_truth
from models.findings import FINDING_NAMES
from worklist import audit, queries
from worklist.deps import ApiCsrf, Db, User, check_csrf, load_study
from worklist.security import CSRF_FIELD
from worklist.users import CurrentUser

router = APIRouter()


class TruthChange(BaseModel):
    finding: str
    label: TruthLabel | None  # null clears it


def _record(session: Session, study: Study, finding: str, label: TruthLabel | None, user: CurrentUser) -> None:
    if finding not in FINDING_NAMES:
        raise HTTPException(422, f"unknown finding; choose from {list(FINDING_NAMES)}")
    now = utcnow()
    before, after = set_truth(session, study.id, finding, label, "radiologist", user.username, now)
    if before != after:
        audit.record(
            session, user.username, "truth", now, study.study_uid, f"{finding}: {before or '-'} -> {after or '-'}"
        )
    session.commit()


@router.post("/studies/{study_uid}/truth", include_in_schema=False)
def truth_form(
    request: Request,
    session: Db,
    user: User,
    study_uid: str,
    finding: Annotated[str, Form()],
    label: Annotated[Literal["present", "absent", "uncertain", "clear"], Form()],
    csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
) -> Response:
    check_csrf(request, csrf_token_)
    study = load_study(session, study_uid)
    _record(session, study, finding, None if label == "clear" else TruthLabel(label), user)
    return RedirectResponse(f"/studies/{study.study_uid}#truth", status_code=303)


@router.put("/api/studies/{study_uid}/truth", tags=["studies"], dependencies=[ApiCsrf])
def api_truth(session: Db, user: User, study_uid: str, body: TruthChange) -> dict[str, Any]:
    """Record what the study shows for one finding after reading (present, absent, uncertain; null clears)."""
    study = load_study(session, study_uid)
    _record(session, study, body.finding, body.label, user)
    return {"study_uid": study.study_uid, "truth": queries.study_truth(session, study.id)}
