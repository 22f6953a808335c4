"""``/healthz`` for load balancers and supervisors: no login, no patient data."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from db.models import utcnow
from worklist import health
from worklist.deps import settings_of

router = APIRouter()


@router.get("/healthz", tags=["health"])
def healthz(request: Request) -> JSONResponse:
    """Listener (C-ECHO), database, broker and workers: 200 when all answer, 503 naming what does not."""
    factory: sessionmaker[Session] = request.app.state.factory
    status = health.health(settings_of(request), factory, utcnow())
    brief = {
        "ok": status["ok"],
        "checks": {k: {kk: vv for kk, vv in v.items() if kk != "workers"} for k, v in status["checks"].items()},
    }
    return JSONResponse(brief, status_code=200 if status["ok"] else 503)
