"""`/metrics`: Prometheus text format without a login (it carries no patient data; see worklist.metrics)."""

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.orm import Session, sessionmaker

from worklist import health, metrics
from worklist.deps import settings_of

router = APIRouter()


@router.get("/metrics", tags=["monitoring"], response_class=Response)
def prometheus_metrics(request: Request) -> Response:
    """Time to priority per calling AE, studies per state, flags per finding and model, exports, queue depths."""
    settings = settings_of(request)
    factory: sessionmaker[Session] = request.app.state.factory
    broker = health.bounded(health.broker_check, settings)
    depths = broker.get("queues", {}) if broker.get("ok") else {}
    return Response(metrics.render(factory, depths), media_type=CONTENT_TYPE_LATEST)
