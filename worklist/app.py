"""The worklist web app: server-rendered pages and a JSON API over one database.

``create_app(settings)`` builds everything from the one Settings object, so the app under
test is the app in production: the app's state (settings, sessions, templates, caches), the
security headers, the error answers (``worklist.errors``) and one router per area
(``worklist.routers``).  Endpoints are thin: they parse, check the user and CSRF token, call
``worklist.queries`` / ``worklist.imaging``, write the audit trail and render.  Sync endpoints
on purpose: FastAPI runs them in its thread pool, and the database layer is synchronous
SQLAlchemy like the rest of the project.
"""

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from starlette.middleware.sessions import SessionMiddleware

from db.session import make_engine, make_sessionmaker
from models.findings import DISCLAIMER, FINDINGS
from settings import Settings
from worklist import errors, localtime, queries
from worklist.routers import (
    admin,
    analyse,
    auth,
    exports,
    health,
    metrics,
    performance,
    site_settings,
    study,
    truth,
    worklist,
)
from worklist.security import CSRF_HEADER, session_secret

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "xt_session"
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
ROUTERS = (auth, worklist, study, truth, exports, analyse, admin, site_settings, performance, health, metrics)


async def _security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    docs = request.url.path.startswith(DOCS_PATHS)
    response.headers.setdefault("Content-Security-Policy", DOCS_CSP if docs else CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if "cache-control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response


def create_app(settings: Settings) -> FastAPI:
    web = settings.web
    engine = make_engine(settings.database.url, hide_parameters=True)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(disclaimer=DISCLAIMER, findings=FINDINGS, refresh_s=web.refresh_s)
    templates.env.filters["pn"] = queries.person_name
    zone = localtime.site_zone(web.time_zone)
    templates.env.filters["local"] = lambda value, seconds=False: localtime.local_time(value, zone, seconds)
    templates.env.globals["time_zone"] = localtime.zone_label(zone)
    templates.env.filters["da"] = localtime.dicom_date
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="xray-triage worklist API",
        version="1",
        description=f"Chest X-ray triage worklist. {DISCLAIMER} Log in with POST /api/login; "
        f"state changes need the {CSRF_HEADER} header returned by the login.",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.factory = make_sessionmaker(engine)
    app.state.templates = templates
    app.state.ae_titles = worklist.AeTitles()
    app.state.scorer = analyse.LazyScorer(settings)
    secret = session_secret(web.secret_key, Path(settings.storage.spool_dir).parent / "web-secret-key")
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie=SESSION_COOKIE,
        max_age=web.session_max_age_s,
        same_site="lax",
        https_only=web.cookie_secure,
    )
    app.middleware("http")(_security_headers)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    errors.install(app)
    for area in ROUTERS:
        app.include_router(area.router)
    return app
