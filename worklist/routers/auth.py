"""Logging in and out, by form (pages) and by JSON (API), with lockout after repeated failures."""

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException

from db.models import utcnow
from worklist import audit, sessions
from worklist.deps import ApiCsrf, Db, User, check_csrf, csrf_token, page, settings_of
from worklist.security import CSRF_FIELD, new_csrf_token
from worklist.users import CurrentUser, authenticate

router = APIRouter()


class LoginRequest(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


def safe_next(target: str | None) -> str:
    """Only a path on this site: an open redirect after login would be a phishing aid."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/worklist"


def _login(request: Request, session: Session, username: str, password: str) -> CurrentUser:
    """Check the password (unless this name is locked out), start a server-side session."""
    web = settings_of(request).web
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
    user = sessions.session_user(session, token, now, settings_of(request).web.session_max_age_s)
    sessions.revoke(session, token, now)
    if user:
        audit.record(session, user.username, "logout", now)
    session.commit()
    request.session.clear()


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return page(request, "login.html", next=safe_next(next), error=None)


@router.post("/login", include_in_schema=False)
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
        return page(request, "login.html", exc.status_code, next=safe_next(next), error=exc.detail)
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/logout", include_in_schema=False)
def logout(
    request: Request, session: Db, csrf_token_: Annotated[str | None, Form(alias=CSRF_FIELD)] = None
) -> Response:
    check_csrf(request, csrf_token_)
    _logout(request, session)
    return RedirectResponse("/login", status_code=303)


@router.post("/api/login", tags=["session"])
def api_login(request: Request, session: Db, body: LoginRequest) -> dict[str, Any]:
    """Log in; the answer's `csrf_token` goes into the X-CSRF-Token header of every change.

    After `web.login_max_failures` failed logins for one user name within
    `web.login_lockout_min` minutes, further attempts for it answer 429.
    """
    user = _login(request, session, body.username, body.password)
    return {"user": user.username, "role": user.role.value, "csrf_token": csrf_token(request)}


@router.post("/api/logout", tags=["session"], dependencies=[ApiCsrf])
def api_logout(request: Request, user: User, session: Db) -> dict[str, Any]:
    """End the session server-side: the cookie no longer works anywhere."""
    _logout(request, session)
    return {"ok": True}


@router.get("/api/me", tags=["session"])
def api_me(request: Request, user: User) -> dict[str, Any]:
    return {"user": user.username, "role": user.role.value, "csrf_token": csrf_token(request)}
