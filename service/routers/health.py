"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.dependencies import Metrics, Pool
from service.schemas import RETRY_AFTER, HealthResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is alive and its event loop answers."""
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={
        503: {
            "model": HealthResponse,
            "description": "not_ready while models load (or failed to, or after "
            "--max-engine-failures), draining on shutdown",
            "headers": RETRY_AFTER,
        }
    },
)
async def readyz(pool: Pool) -> HealthResponse | JSONResponse:
    """200 once every model is loaded and warmed up; 503 while loading or draining."""
    if pool.ready:
        return HealthResponse(status="ready", detail=f"{len(pool.runners)} models")
    status = "draining" if pool.draining else "not_ready"
    detail = pool.failure or ("shutting down" if pool.draining else "models are loading")
    body = HealthResponse(status=status, detail=detail)
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(service_metrics: Metrics) -> Response:
    """Prometheus exposition of this app's registry."""
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
