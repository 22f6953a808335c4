"""The worklist: studies in triage order, filtered and paged (page, refreshable rows, JSON)."""

import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Study, utcnow
from models.findings import DISCLAIMER
from worklist import queries
from worklist.deps import Db, User, page, site_settings_of
from worklist.reasons import for_user

router = APIRouter()

AE_TITLES_TTL_S = 60.0
WorklistParams = Annotated[queries.WorklistQuery, Query()]


class AeTitles:
    """Source AE titles for the filter; re-read once a minute, not per page (DISTINCT reads the table)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._titles: list[str] = []

    def get(self, session: Session) -> list[str]:
        with self._lock:
            if time.monotonic() - self._at > AE_TITLES_TTL_S:
                stmt = select(Study.calling_ae).distinct().order_by(Study.calling_ae).limit(200)
                self._titles = [str(a) for a in session.scalars(stmt)]
                self._at = time.monotonic()
            return list(self._titles)


def _worklist(request: Request, session: Session, q: queries.WorklistQuery) -> queries.Page:
    settings = site_settings_of(request, session)
    return queries.worklist_page(session, q, settings.triage, settings.web, utcnow())


@router.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
def worklist_page(request: Request, session: Db, user: User, q: WorklistParams) -> HTMLResponse:
    result = _worklist(request, session, q)
    ae_titles: AeTitles = request.app.state.ae_titles
    return page(
        request,
        "worklist.html",
        user=user,
        result=result,
        q=q,
        ae_titles=ae_titles.get(session),
        params=q.as_params(),
        silent=site_settings_of(request, session).triage.silent_mode,
    )


@router.get("/worklist/rows", response_class=HTMLResponse, include_in_schema=False)
def worklist_rows(request: Request, session: Db, user: User, q: WorklistParams) -> HTMLResponse:
    """The table body alone: what the page's refresh swaps in, keeping filters and scroll."""
    result = _worklist(request, session, q)
    response = page(request, "_rows.html", user=user, result=result, q=q)
    response.headers["X-Total"] = result.total_label
    response.headers["X-Total-Label"] = result.count_label
    return response


@router.get("/api/worklist", tags=["worklist"])
def api_worklist(request: Request, session: Db, user: User, q: WorklistParams) -> dict[str, Any]:
    """Studies in triage order (effective priority, then waiting time), filtered and paged."""
    data = _worklist(request, session, q).to_dict()
    data["items"] = [for_user(row, user.is_admin) for row in data["items"]]
    return {**data, "disclaimer": DISCLAIMER}
