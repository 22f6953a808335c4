"""What every router of the web app depends on: the database session, the user, CSRF checks, pages.

Everything here reads the app's state (``request.app.state``: settings, session factory,
templates), which ``worklist.app.create_app`` sets once, so the routers are plain modules and
the app under test is the app in production.  No ``from __future__ import annotations`` in
this package: FastAPI resolves the ``Annotated`` dependency aliases from real objects.
"""

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException

from db.models import Study, utcnow
from dicom_io.uids import is_valid_uid
from settings import Settings
from triage.site import site_settings
from worklist import queries, sessions
from worklist.security import csrf_matches, new_csrf_token
from worklist.users import CurrentUser

API_PREFIXES = ("/api/", "/healthz")


class NotLoggedIn(Exception):
    """No valid session: pages redirect to the login page, the API answers 401."""


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def is_api(request: Request) -> bool:
    return request.url.path.startswith(API_PREFIXES)


def db(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.factory
    session = factory()
    try:
        yield session
    finally:
        session.rollback()  # endpoints commit what they mean to keep
        session.close()


Db = Annotated[Session, Depends(db)]
Config = Annotated[Settings, Depends(settings_of)]


def site_settings_of(request: Request, session: Db) -> Settings:
    """The configuration with the site's audited overrides (thresholds, silent mode) applied now."""
    return site_settings(session, settings_of(request))


# What scoring, ordering and the admin page use: a change made on the admin page applies at once.
SiteConfig = Annotated[Settings, Depends(site_settings_of)]


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = new_csrf_token()
    return str(token)


def current_user(request: Request, session: Db) -> CurrentUser:
    max_age = settings_of(request).web.session_max_age_s
    user = sessions.session_user(session, request.session.get("sid"), utcnow(), max_age)
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
    templates: Jinja2Templates = request.app.state.templates
    context.setdefault("user", None)
    context["csrf_token"] = csrf_token(request)
    return templates.TemplateResponse(request, name, context, status_code=status_code)
