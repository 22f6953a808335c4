"""The worklist web app: server-rendered pages and a JSON API over one database.

``create_app(settings)`` builds everything from the one Settings object, so the app under
test is the app in production.  Endpoints are thin: they parse, check the user and CSRF
token, call ``worklist.queries`` / ``worklist.imaging``, write the audit trail and render.
Sync endpoints on purpose: FastAPI runs them in its thread pool, and the database layer is
synchronous SQLAlchemy like the rest of the project.  No ``from __future__ import
annotations`` here: FastAPI must see the real dependency types of the aliases defined inside
``create_app`` (string annotations cannot be resolved in that closure).
"""

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import sqlalchemy.exc
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

from db.models import ReadState, Study, utcnow
from db.session import make_engine, make_sessionmaker
from dicom_io.uids import is_valid_uid
from models.findings import DISCLAIMER, FINDING_NAMES, FINDINGS
from worker.config import Settings, effective_config
from worklist import audit, health, imaging, queries, sessions
from worklist.security import CSRF_FIELD, CSRF_HEADER, csrf_matches, new_csrf_token, session_secret
from worklist.users import CurrentUser, authenticate

log = logging.getLogger("xray_triage.web")

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "xt_session"
API_PREFIXES = ("/api/", "/healthz")
AE_TITLES_TTL_S = 60.0
# Pages may load only our own scripts, styles and images (data: for analysed uploads).
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
# /docs (Swagger UI) and /redoc come from the fastapi-offline package, scripts included:
# hospital networks reach no CDN.  They start with an inline script, which only they may run.
DOCS_PATHS = ("/docs", "/redoc")
DOCS_ASSETS = "/docs-assets"
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'"
)


class NotLoggedIn(Exception):
    """No valid session: pages redirect to the login page, the API answers 401."""


class ReadStateChange(BaseModel):
    state: ReadState


class LoginRequest(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(API_PREFIXES)


def _safe_next(target: str | None) -> str:
    """Only a path on this site: an open redirect after login would be a phishing aid."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/worklist"


def create_app(settings: Settings) -> FastAPI:
    web = settings.web
    engine = make_engine(settings.database.url, hide_parameters=True)
    factory = make_sessionmaker(engine)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(disclaimer=DISCLAIMER, findings=FINDINGS, refresh_s=web.refresh_s)
    templates.env.filters["pn"] = queries.person_name
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="xray-triage worklist API",
        version="1",
        description=f"Chest X-ray triage worklist. {DISCLAIMER} Log in with POST /api/login; "
        f"state changes need the {CSRF_HEADER} header returned by the login.",
    )
    app.state.settings = settings
    app.state.factory = factory
    app.state.engine = engine
    secret = session_secret(web.secret_key, Path(settings.storage.spool_dir).parent / "web-secret-key")
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie=SESSION_COOKIE,
        max_age=web.session_max_age_s,
        same_site="lax",
        https_only=web.cookie_secure,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        docs = request.url.path.startswith(DOCS_PATHS)
        response.headers.setdefault("Content-Security-Policy", DOCS_CSP if docs else CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if "cache-control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response

    # ------------------------------------------------------------------ dependencies

    def db() -> Iterator[Session]:
        session = factory()
        try:
            yield session
        finally:
            session.rollback()  # endpoints commit what they mean to keep
            session.close()

    Db = Annotated[Session, Depends(db)]

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = new_csrf_token()
        return str(token)

    def current_user(request: Request, session: Db) -> CurrentUser:
        user = sessions.session_user(session, request.session.get("sid"), utcnow(), web.session_max_age_s)
        if user is None:
            raise NotLoggedIn()
        return user

    User = Annotated[CurrentUser, Depends(current_user)]

    def admin_user(user: User) -> CurrentUser:
        if not user.is_admin:
            raise HTTPException(403, "this needs the admin role")
        return user

    Admin = Annotated[CurrentUser, Depends(admin_user)]

    def check_csrf(request: Request, given: str | None) -> None:
        if not csrf_matches(request.session.get("csrf"), given):
            raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")

    def api_csrf(request: Request, x_csrf_token: Annotated[str | None, Header()] = None) -> None:
        check_csrf(request, x_csrf_token)

    ApiCsrf = Depends(api_csrf)

    def valid_uid(uid: str, what: str = "study UID") -> str:
        if not is_valid_uid(uid):
            raise HTTPException(400, f"invalid {what}")
        return uid

    def load_study(session: Session, study_uid: str) -> Study:
        study = queries.find_study(session, valid_uid(study_uid))
        if study is None:
            raise HTTPException(404, "no such study")
        return study

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("user", None)
        context["csrf_token"] = csrf_token(request)
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(NotLoggedIn)
    async def _not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        if _is_api(request):
            return JSONResponse({"error": "not logged in", "status": 401}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if _is_api(request) or request.url.path.startswith(("/static", DOCS_ASSETS, "/docs", "/openapi")):
            return JSONResponse({"error": exc.detail, "status": exc.status_code}, status_code=exc.status_code)
        return page(request, "error.html", exc.status_code, message=exc.detail, status=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Response:
        details = [
            {
                "field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body", "path")),
                "message": e.get("msg"),
            }
            for e in exc.errors()
        ]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or "bad request"
        if _is_api(request):
            return JSONResponse({"error": message, "status": 422, "details": details}, status_code=422)
        return page(request, "error.html", 400, message=message, status=400)

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    @app.exception_handler(sqlalchemy.exc.InterfaceError)
    async def _database_down(request: Request, exc: Exception) -> Response:
        # The pages stay up while the database is away; nothing was changed, try again later.
        log.warning("%s %s: database unavailable (%s)", request.method, request.url.path, type(exc).__name__)
        message = "the database is unavailable; nothing was changed, try again in a moment"
        if _is_api(request):
            return JSONResponse({"error": message, "status": 503}, status_code=503)
        return page(request, "error.html", 503, message=message, status=503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        message = "internal error; the details are in the server log"
        if _is_api(request):
            return JSONResponse({"error": message, "status": 500}, status_code=500)
        return page(request, "error.html", 500, message=message, status=500)

    # ------------------------------------------------------------------ log in / out

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/worklist", status_code=303)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str | None = None) -> HTMLResponse:
        return page(request, "login.html", next=_safe_next(next), error=None)

    def _login(request: Request, session: Session, username: str, password: str) -> CurrentUser:
        """Check the password (unless this name is locked out), start a server-side session."""
        now = utcnow()
        name = sessions.throttle_name(username)
        if sessions.recent_failures(session, name, now, web.login_lockout_min) >= web.login_max_failures:
            raise HTTPException(
                429, f"too many failed logins for this user name; try again in {web.login_lockout_min:.0f} minutes"
            )
        user = authenticate(session, username, password)
        if user is None:
            audit.record(session, name, sessions.LOGIN_FAILED, now)
            session.commit()
            raise HTTPException(401, "wrong user name or password")
        audit.record(session, user.username, "login", now)
        token = sessions.open_session(session, user.id, now)
        session.commit()
        request.session.clear()  # new token and CSRF token: no fixation across the login
        request.session.update(sid=token, csrf=new_csrf_token())
        return user

    def _logout(request: Request, session: Session) -> None:
        now = utcnow()
        token = request.session.get("sid")
        user = sessions.session_user(session, token, now, web.session_max_age_s)
        sessions.revoke(session, token, now)
        if user:
            audit.record(session, user.username, "logout", now)
        session.commit()
        request.session.clear()

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        session: Db,
        username: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=1024)],
        csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
        next: Annotated[str | None, Form()] = None,
    ) -> Response:
        check_csrf(request, csrf_token_)
        try:
            _login(request, session, username, password)
        except HTTPException as exc:
            return page(request, "login.html", exc.status_code, next=_safe_next(next), error=exc.detail)
        return RedirectResponse(_safe_next(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(
        request: Request, session: Db, csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None
    ) -> Response:
        check_csrf(request, csrf_token_)
        _logout(request, session)
        return RedirectResponse("/login", status_code=303)

    @app.post("/api/login", tags=["session"])
    def api_login(request: Request, session: Db, body: LoginRequest) -> dict[str, Any]:
        """Log in; the answer's `csrf_token` goes into the X-CSRF-Token header of every change.

        After `web.login_max_failures` failed logins for one user name within
        `web.login_lockout_min` minutes, further attempts for it answer 429.
        """
        user = _login(request, session, body.username, body.password)
        return {"user": user.username, "role": user.role.value, "csrf_token": csrf_token(request)}

    @app.post("/api/logout", tags=["session"], dependencies=[ApiCsrf])
    def api_logout(request: Request, user: User, session: Db) -> dict[str, Any]:
        """End the session server-side: the cookie no longer works anywhere."""
        _logout(request, session)
        return {"ok": True}

    @app.get("/api/me", tags=["session"])
    def api_me(request: Request, user: User) -> dict[str, Any]:
        return {"user": user.username, "role": user.role.value, "csrf_token": csrf_token(request)}

    # ------------------------------------------------------------------ worklist

    WorklistParams = Annotated[queries.WorklistQuery, Query()]

    def _worklist(session: Session, q: queries.WorklistQuery) -> queries.Page:
        return queries.worklist_page(session, q, settings.triage, web, utcnow())

    ae_cache: dict[str, Any] = {"at": 0.0, "titles": []}

    def _ae_titles(session: Session) -> list[str]:
        """Source AE titles for the filter; re-read once a minute, not per page (DISTINCT reads the table)."""
        if time.monotonic() - ae_cache["at"] > AE_TITLES_TTL_S:
            stmt = select(Study.calling_ae).distinct().order_by(Study.calling_ae).limit(200)
            ae_cache.update(at=time.monotonic(), titles=[str(a) for a in session.scalars(stmt)])
        return list(ae_cache["titles"])

    @app.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
    def worklist_page(request: Request, session: Db, user: User, q: WorklistParams) -> HTMLResponse:
        result = _worklist(session, q)
        return page(
            request,
            "worklist.html",
            user=user,
            result=result,
            q=q,
            ae_titles=_ae_titles(session),
            params=q.as_params(),
            silent=settings.triage.silent_mode,
        )

    @app.get("/worklist/rows", response_class=HTMLResponse, include_in_schema=False)
    def worklist_rows(request: Request, session: Db, user: User, q: WorklistParams) -> HTMLResponse:
        """The table body alone: what the page's refresh swaps in, keeping filters and scroll."""
        result = _worklist(session, q)
        response = page(request, "_rows.html", user=user, result=result, q=q)
        response.headers["X-Total"] = result.total_label
        return response

    @app.get("/api/worklist", tags=["worklist"])
    def api_worklist(session: Db, user: User, q: WorklistParams) -> dict[str, Any]:
        """Studies in triage order (effective priority, then waiting time), filtered and paged."""
        return {**_worklist(session, q).to_dict(), "disclaimer": DISCLAIMER}

    # ------------------------------------------------------------------ one study

    def _detail(session: Session, study: Study, user: CurrentUser, channel: str) -> dict[str, Any]:
        audit.record(session, user.username, "view_study", utcnow(), study.study_uid, channel)
        session.commit()
        return queries.study_detail(session, study, settings.triage, web, utcnow())

    @app.get("/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(request: Request, session: Db, user: User, study_uid: str) -> HTMLResponse:
        study = load_study(session, study_uid)
        detail = _detail(session, study, user, "page")
        return page(request, "study.html", user=user, s=detail, read_states=list(ReadState))

    @app.get("/api/studies/{study_uid}", tags=["studies"])
    def api_study(session: Db, user: User, study_uid: str) -> dict[str, Any]:
        study = load_study(session, study_uid)
        return {**_detail(session, study, user, "api"), "disclaimer": DISCLAIMER}

    def _change_read_state(session: Session, study: Study, state: ReadState, user: CurrentUser) -> None:
        before = str(study.read_state)
        now = utcnow()
        queries.set_read_state(session, study, state, user.username, now)
        audit.record(session, user.username, "read_state", now, study.study_uid, f"{before} -> {state.value}")
        session.commit()

    @app.post("/studies/{study_uid}/read-state", include_in_schema=False)
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

    @app.post("/api/studies/{study_uid}/read-state", tags=["studies"], dependencies=[ApiCsrf])
    def api_read_state(session: Db, user: User, study_uid: str, body: ReadStateChange) -> dict[str, Any]:
        """Mark a study unread, in progress or read (recorded with who and when)."""
        study = load_study(session, study_uid)
        _change_read_state(session, study, body.state, user)
        return {"study_uid": study.study_uid, "read_state": str(study.read_state), "read_by": study.read_by}

    def _instance_files(session: Session, study_uid: str, sop_uid: str) -> tuple[Any, Any]:
        study = load_study(session, study_uid)
        found = queries.instance_for(session, study, valid_uid(sop_uid, "SOP Instance UID"))
        if found is None:
            raise HTTPException(404, "no such instance in this study")
        return found

    def _png(data: bytes, etag: str) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600", "ETag": etag})

    @app.get(
        "/api/studies/{study_uid}/instances/{sop_uid}/image.png",
        tags=["images"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def api_image(session: Db, user: User, study_uid: str, sop_uid: str) -> Response:
        """The radiograph rendered by the project's pixel path (windowed; longer side <= 1024 px)."""
        inst, _ = _instance_files(session, study_uid, sop_uid)
        path = Path(settings.storage.spool_dir) / inst.spool_path
        try:
            data = imaging.display_png(path, inst.sha256, settings.pixels)
        except Exception as exc:  # noqa: BLE001 - an undecodable instance is a 422, not a crash
            raise HTTPException(422, f"the image cannot be rendered: {type(exc).__name__}") from None
        return _png(data, f'"{inst.sha256}"')

    @app.get(
        "/api/studies/{study_uid}/instances/{sop_uid}/heatmaps/{finding}.png",
        tags=["images"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def api_heatmap(session: Db, user: User, study_uid: str, sop_uid: str, finding: str) -> Response:
        """The finding's Grad-CAM heatmap (RGBA) cut to the radiograph's aspect, to lay over image.png."""
        if finding not in FINDING_NAMES:
            raise HTTPException(404, f"unknown finding; choose from {list(FINDING_NAMES)}")
        inst, result = _instance_files(session, study_uid, sop_uid)
        stored = (result.heatmaps or {}).get(finding) if result is not None else None
        if not stored or not Path(stored).is_file():
            raise HTTPException(404, "no heatmap for this finding (heatmaps are kept for flagged findings)")
        shape = imaging.image_shape(Path(settings.storage.spool_dir) / inst.spool_path)
        return _png(imaging.heatmap_png(Path(stored), shape), f'"{inst.sha256}-{finding}"')

    # ------------------------------------------------------------------ analyse an image

    model_lock = threading.Lock()

    def _model() -> Any:
        with model_lock:  # one load, however many first uploads arrive together
            from models.registry import get_model

            return get_model(settings=settings)

    def _analyse(upload: UploadFile, user: CurrentUser, session: Session) -> dict[str, Any]:
        limit = web.max_upload_mb * 1024 * 1024
        data = upload.file.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"file larger than {web.max_upload_mb} MB")
        if not data:
            raise HTTPException(400, "empty file")
        from worker.scoring import operating_points, steering_points

        model = _model()
        try:
            points, steering = operating_points(model, settings), steering_points(model, settings)
            result = imaging.analyse(data, model, points, settings, steering)
        except imaging.UnreadableImage as exc:
            raise HTTPException(400, str(exc)) from None
        audit.record(session, user.username, "analyse", utcnow(), None, f"{result.kind}, {len(data)} bytes")
        session.commit()
        return {**result.to_dict(), "disclaimer": DISCLAIMER}

    @app.get("/analyse", response_class=HTMLResponse, include_in_schema=False)
    def analyse_page(request: Request, user: User) -> HTMLResponse:
        return page(request, "analyse.html", user=user, result=None, error=None)

    @app.post("/analyse", response_class=HTMLResponse, include_in_schema=False)
    def analyse_form(
        request: Request,
        session: Db,
        user: User,
        file: Annotated[UploadFile, File()],
        csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None,
    ) -> HTMLResponse:
        check_csrf(request, csrf_token_)
        try:
            result = _analyse(file, user, session)
        except HTTPException as exc:
            return page(request, "analyse.html", exc.status_code, user=user, result=None, error=exc.detail)
        return page(request, "analyse.html", user=user, result=result, error=None, filename=file.filename)

    @app.post("/api/analyse", tags=["analyse"], dependencies=[ApiCsrf])
    def api_analyse(session: Db, user: User, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
        """Score an uploaded DICOM, PNG or JPEG at once, with heatmaps (data: URIs); nothing is stored."""
        return _analyse(file, user, session)

    # ------------------------------------------------------------------ admin and health

    def _admin_status(session: Session) -> dict[str, Any]:
        from models.card import ModelCard
        from models.operating_points import PAEDIATRIC, POPULATIONS
        from models.registry import resolve_model_path
        from worker.scoring import card_evidence, card_specificity, card_steering
        from worker.triage import steering_explanation, thresholds_for

        now = utcnow()
        status = health.health(settings, factory, now)
        try:
            card = ModelCard.load(resolve_model_path(settings=settings).parent / "card.json")
            model = {
                "ref": card.ref,
                "thresholds": thresholds_for(card.thresholds, settings.triage),
                "steering": sorted(card_steering(card, settings)),
                "steering_paediatric": sorted(card_steering(card, settings, PAEDIATRIC)),
                "steering_reasons": {
                    pop: {
                        f: steering_explanation(
                            f, card_specificity(card, pop), settings.triage, card_evidence(card, pop)
                        )
                        for f in card.findings
                    }
                    for pop in POPULATIONS
                },
                "paediatric_thresholds": thresholds_for(
                    {**card.thresholds, **card.thresholds_by_population.get("paediatric", {})}, settings.triage
                ),
            }
        except Exception as exc:  # noqa: BLE001 - the page must show the rest when the card is missing
            model = {
                "ref": None,
                "error": f"{type(exc).__name__}: {exc}",
                "thresholds": dict(settings.triage.thresholds),
            }
        return {
            "config": effective_config(settings),
            "model": model,
            "health": status,
            "queues": status["checks"]["broker"].get("queues", {}),
            "workers": health.workers(session, now, web.worker_stale_s),
            "studies": queries.counts_by_state(session),
            "latest_failures": queries.latest_failures(session),
        }

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin_page(request: Request, session: Db, user: Admin) -> HTMLResponse:
        import json

        data = _admin_status(session)
        return page(request, "admin.html", user=user, a=data, config_json=json.dumps(data["config"], indent=2))

    @app.get("/api/admin/status", tags=["admin"])
    def api_admin(session: Db, user: Admin) -> dict[str, Any]:
        """Effective configuration (secrets masked), queue depths, workers, counts, latest failures."""
        return _admin_status(session)

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        """Database, broker and workers: 200 when all answer, 503 naming what does not."""
        status = health.health(settings, factory, utcnow())
        brief = {
            "ok": status["ok"],
            "checks": {k: {kk: vv for kk, vv in v.items() if kk != "workers"} for k, v in status["checks"].items()},
        }
        return JSONResponse(brief, status_code=200 if status["ok"] else 503)

    return app
