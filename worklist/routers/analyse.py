"""Analyse one uploaded image at once (page and API) through the one scoring service; nothing stored."""

import threading
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from db.models import utcnow
from models.findings import DISCLAIMER
from settings import Settings
from triage.service import Scorer
from worklist import audit, heatmap_notes, imaging
from worklist.deps import ApiCsrf, Db, User, check_csrf, page, settings_of, site_settings_of
from worklist.security import CSRF_FIELD
from worklist.users import CurrentUser

router = APIRouter()


class LazyScorer:
    """The model is loaded on the first upload, once, however many first uploads arrive together."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._scorer: Scorer | None = None

    def get(self, settings: Settings | None = None) -> Scorer:
        """The scorer for `settings` (the site's effective ones): rebuilt, model kept, when an
        audited override changed the triage section since the last upload."""
        settings = settings or self._settings
        with self._lock:
            if self._scorer is None or (self._scorer.settings.triage, self._scorer.settings.model) != (
                settings.triage,
                settings.model,
            ):
                from models.registry import get_model

                self._scorer = Scorer(get_model(settings=settings), settings)
            return self._scorer


def _analyse(request: Request, upload: UploadFile, user: CurrentUser, session: Session) -> dict[str, Any]:
    web = settings_of(request).web
    limit = web.max_upload_mb * 1024 * 1024
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"file larger than {web.max_upload_mb} MB")
    if not data:
        raise HTTPException(400, "empty file")
    scorer: LazyScorer = request.app.state.scorer
    try:
        result = imaging.analyse(data, scorer.get(site_settings_of(request, session)))
    except imaging.UnreadableImage as exc:
        raise HTTPException(400, str(exc)) from None
    audit.record(session, user.username, "analyse", utcnow(), None, f"{result.kind}, {len(data)} bytes")
    session.commit()
    return {**result.to_dict(), "disclaimer": DISCLAIMER}


@router.get("/analyse", response_class=HTMLResponse, include_in_schema=False)
def analyse_page(request: Request, user: User) -> HTMLResponse:
    return page(request, "analyse.html", user=user, result=None, error=None)


@router.post("/analyse", response_class=HTMLResponse, include_in_schema=False)
def analyse_form(
    request: Request,
    session: Db,
    user: User,
    file: Annotated[UploadFile, File()],
    csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
) -> HTMLResponse:
    check_csrf(request, csrf_token_)
    try:
        result = _analyse(request, file, user, session)
    except HTTPException as exc:
        return page(request, "analyse.html", exc.status_code, user=user, result=None, error=exc.detail)
    if result["eligible"]:
        result["overlays"] = heatmap_notes.overlays(
            result["heatmaps"],
            result["scores"],
            result["thresholds"],
            set(result["scores"]) - set(result["informational"]),
            heatmap_notes.card_localisation(site_settings_of(request, session), result["model"]),
        )
    return page(request, "analyse.html", user=user, result=result, error=None, filename=file.filename)


@router.post("/api/analyse", tags=["analyse"], dependencies=[ApiCsrf])
def api_analyse(request: Request, session: Db, user: User, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    """Score an uploaded DICOM, PNG or JPEG at once, with heatmaps (data: URIs); nothing is stored.

    An image outside what the model reads (the site's eligibility rules for a DICOM header;
    colour, size, shape and contrast for a PNG or JPEG) is not scored: ``eligible`` is false,
    ``reason`` says why as the worker stores it and ``ai_reason`` in words for the radiologist;
    ``scores``, ``thresholds``, ``flags`` and ``heatmaps`` are empty objects, ``top_findings``
    and ``informational`` empty lists; ``image_png`` still shows what was refused.
    """
    return _analyse(request, file, user, session)
