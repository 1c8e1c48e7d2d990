"""Liveness, readiness and Prometheus metrics. Never behind auth: probes and scrapers carry no key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.schemas import Health

router = APIRouter(tags=["system"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Live: the process answers HTTP. (A stuck engine shows in /ready, not here.)"""
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(request: Request) -> JSONResponse:
    """Ready: the model is loaded and the engine loop is running and not draining."""
    state = request.app.state
    if state.ready and state.engine.is_running and not state.draining:
        return JSONResponse({"status": "ready"})
    status = "draining" if state.ready or state.draining else "starting"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
