"""How the web app answers what went wrong: JSON with a status for the API, an error page for people.

The pages stay up while the database is away (503, nothing changed); anything unexpected is
logged by type with its traceback server-side and answered 500 without details.
"""

import logging
from urllib.parse import urlencode

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from worklist.deps import NotLoggedIn, is_api, page

log = logging.getLogger("xray_triage.web")

# Paths whose errors are JSON even though they are not under /api/: assets and the API docs.
JSON_ERROR_PREFIXES = ("/static", "/docs-assets", "/docs", "/openapi")


async def _not_logged_in(request: Request, exc: Exception) -> Response:
    if is_api(request):
        return JSONResponse({"error": "not logged in", "status": 401}, status_code=401)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if is_api(request) or request.url.path.startswith(JSON_ERROR_PREFIXES):
        return JSONResponse({"error": exc.detail, "status": exc.status_code}, status_code=exc.status_code)
    return page(request, "error.html", exc.status_code, message=exc.detail, status=exc.status_code)


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body", "path")),
            "message": e.get("msg"),
        }
        for e in exc.errors()
    ]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or "bad request"
    if is_api(request):
        return JSONResponse({"error": message, "status": 422, "details": details}, status_code=422)
    return page(request, "error.html", 400, message=message, status=400)


async def _database_down(request: Request, exc: Exception) -> Response:
    log.warning("%s %s: database unavailable (%s)", request.method, request.url.path, type(exc).__name__)
    message = "the database is unavailable; nothing was changed, try again in a moment"
    if is_api(request):
        return JSONResponse({"error": message, "status": 503}, status_code=503)
    return page(request, "error.html", 503, message=message, status=503)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    message = "internal error; the details are in the server log"
    if is_api(request):
        return JSONResponse({"error": message, "status": 500}, status_code=500)
    return page(request, "error.html", 500, message=message, status=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(NotLoggedIn, _not_logged_in)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(sqlalchemy.exc.OperationalError, _database_down)
    app.add_exception_handler(sqlalchemy.exc.InterfaceError, _database_down)
    app.add_exception_handler(Exception, _unexpected)
