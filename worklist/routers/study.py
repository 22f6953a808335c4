"""One study: its detail page and JSON, its read state, and its images and heatmaps as PNG."""

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from db.models import Instance, InstanceResult, ReadState, Study, utcnow
from models.findings import DISCLAIMER, FINDING_NAMES
from worklist import audit, heatmap_notes, imaging, queries, viewer_data
from worklist.deps import ApiCsrf, Config, Db, User, check_csrf, load_study, page, settings_of, valid_uid
from worklist.reasons import for_user
from worklist.security import CSRF_FIELD
from worklist.users import CurrentUser

router = APIRouter()


class ReadStateChange(BaseModel):
    state: ReadState


def _with_overlays(detail: dict[str, Any], localisation: dict[str, Any] | None) -> dict[str, Any]:
    """Each instance's heatmaps as the viewer offers them (``worklist.heatmap_notes``)."""
    steering = detail["steering_findings"] if detail["steering_known"] else None
    for inst in detail["instances"]:
        res = inst["result"]
        if not res:
            continue
        base = f"/api/studies/{detail['study_uid']}/instances/{inst['sop_instance_uid']}/heatmaps/"
        res["overlays"] = heatmap_notes.overlays(
            {f: f"{base}{f}.png" for f in res["heatmaps"]},
            res["scores"] or {},
            res["thresholds"] or {},
            steering,
            localisation,
        )
    return detail


def _detail(request: Request, session: Session, study: Study, user: CurrentUser, channel: str) -> dict[str, Any]:
    settings = settings_of(request)
    audit.record(session, user.username, "view_study", utcnow(), study.study_uid, channel)
    session.commit()
    detail = queries.study_detail(session, study, settings.triage, settings.web, utcnow())
    return _with_overlays(detail, heatmap_notes.card_localisation(settings, study.model_ref))


def _change_read_state(session: Session, study: Study, state: ReadState, user: CurrentUser) -> None:
    before = str(study.read_state)
    now = utcnow()
    queries.set_read_state(session, study, state, user.username, now)
    audit.record(session, user.username, "read_state", now, study.study_uid, f"{before} -> {state.value}")
    session.commit()


def _instance_files(session: Session, study_uid: str, sop_uid: str) -> tuple[Instance, InstanceResult | None]:
    study = load_study(session, study_uid)
    found = queries.instance_for(session, study, valid_uid(sop_uid, "SOP Instance UID"))
    if found is None:
        raise HTTPException(404, "no such instance in this study")
    return found


def _png(data: bytes, etag: str) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600", "ETag": etag})


@router.get("/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
def study_page(request: Request, session: Db, user: User, study_uid: str) -> HTMLResponse:
    study = load_study(session, study_uid)
    detail = _detail(request, session, study, user, "page")
    return page(request, "study.html", user=user, s=detail, read_states=list(ReadState))


@router.get("/api/studies/{study_uid}", tags=["studies"])
def api_study(request: Request, session: Db, user: User, study_uid: str) -> dict[str, Any]:
    study = load_study(session, study_uid)
    return {**for_user(_detail(request, session, study, user, "api"), user.is_admin), "disclaimer": DISCLAIMER}


@router.post("/studies/{study_uid}/read-state", include_in_schema=False)
def study_read_state(
    request: Request,
    session: Db,
    user: User,
    study_uid: str,
    state: Annotated[ReadState, Form()],
    csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
) -> Response:
    check_csrf(request, csrf_token_)
    study = load_study(session, study_uid)
    _change_read_state(session, study, state, user)
    return RedirectResponse(f"/studies/{study.study_uid}", status_code=303)


@router.post("/api/studies/{study_uid}/read-state", tags=["studies"], dependencies=[ApiCsrf])
def api_read_state(session: Db, user: User, study_uid: str, body: ReadStateChange) -> dict[str, Any]:
    """Mark a study unread, in progress or read (recorded with who and when)."""
    study = load_study(session, study_uid)
    _change_read_state(session, study, body.state, user)
    return {"study_uid": study.study_uid, "read_state": str(study.read_state), "read_by": study.read_by}


@router.get(
    "/api/studies/{study_uid}/instances/{sop_uid}/image.png",
    tags=["images"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def api_image(settings: Config, session: Db, user: User, study_uid: str, sop_uid: str) -> Response:
    """The radiograph rendered by the project's pixel path (windowed; longer side <= 1024 px)."""
    inst, _ = _instance_files(session, study_uid, sop_uid)
    path = Path(settings.storage.spool_dir) / inst.spool_path
    try:
        data = imaging.display_png(path, inst.sha256, settings.pixels)
    except Exception as exc:  # noqa: BLE001 - an undecodable instance is a 422, not a crash
        raise HTTPException(422, f"the image cannot be rendered: {type(exc).__name__}") from None
    return _png(data, f'"{inst.sha256}"')


@router.get(
    "/api/studies/{study_uid}/instances/{sop_uid}/heatmaps/{finding}.png",
    tags=["images"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def api_heatmap(settings: Config, session: Db, user: User, study_uid: str, sop_uid: str, finding: str) -> Response:
    """The finding's Grad-CAM heatmap (RGBA) cut to the radiograph's aspect, to lay over image.png."""
    if finding not in FINDING_NAMES:
        raise HTTPException(404, f"unknown finding; choose from {list(FINDING_NAMES)}")
    inst, result = _instance_files(session, study_uid, sop_uid)
    stored = (result.heatmaps or {}).get(finding) if result is not None else None
    if not stored or not Path(stored).is_file():
        raise HTTPException(404, "no heatmap for this finding (heatmaps are kept for flagged findings)")
    shape = imaging.image_shape(Path(settings.storage.spool_dir) / inst.spool_path)
    return _png(imaging.heatmap_png(Path(stored), shape), f'"{inst.sha256}-{finding}"')


@router.get(
    "/api/studies/{study_uid}/instances/{sop_uid}/values",
    tags=["images"],
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def api_values(settings: Config, session: Db, user: User, study_uid: str, sop_uid: str, size: int = 1024) -> Response:
    """The radiograph's values before windowing, for the viewer's own window/level.

    Little-endian uint16, rows x columns (``X-Viewer-Rows``/``-Columns``), 0..65535 mapping
    linearly onto ``X-Viewer-Low``..``-High`` in modality units; ``X-Viewer-Window-Center``/
    ``-Width`` is the window the model's rendering used.  ``size``: longer side, one of
    1024, 2048, 4096 (never more than the image's own).  Sent gzip-encoded.
    """
    if size not in viewer_data.SIZES:
        raise HTTPException(422, f"size must be one of {list(viewer_data.SIZES)}")
    inst, _ = _instance_files(session, study_uid, sop_uid)
    path = Path(settings.storage.spool_dir) / inst.spool_path
    try:
        body, headers = viewer_data.viewer_payload(path, inst.sha256, size, settings.pixels)
    except Exception as exc:  # noqa: BLE001 - an undecodable instance is a 422, not a crash
        raise HTTPException(422, f"the image cannot be rendered: {type(exc).__name__}") from None
    return Response(
        body,
        media_type="application/octet-stream",
        headers={
            **headers,
            "Content-Encoding": "gzip",
            "Cache-Control": "private, max-age=3600",
            "ETag": f'"{inst.sha256}-{size}"',
        },
    )


@router.get(
    "/api/legend/heatmap.png", tags=["images"], response_class=Response, responses={200: {"content": {"image/png": {}}}}
)
def api_heatmap_legend(user: User) -> Response:
    """The heatmaps' colour ramp (low attention left, high right), for the viewer's legend."""
    return Response(
        viewer_data.legend_png(), media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
    )
