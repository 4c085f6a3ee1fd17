"""GET /metrics: Prometheus text exposition of this app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.app.deps import MetricsDep
from service.app.schemas import problem_responses
from service.app.security import require_api_key

router = APIRouter(tags=["operations"], dependencies=[Depends(require_api_key)])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}, **problem_responses(401)},
    summary="Prometheus metrics",
)
async def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
