"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from runtime.metrics import render
from service.deps import StateDep
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(state: StateDep) -> Response:
    """Redis reachable, at least one worker with its model loaded, bank open."""
    checks = {
        "mode": state.mode,
        "job_store": state.store.ping(),
        "workers": state.workers_ready(),
        "bank_clips": len(state.bank),
    }
    ready = bool(checks["job_store"]) and checks["workers"] > 0
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    """Prometheus text format: queue depth, job and step durations, retrieval latency, errors."""
    payload = render(state.metrics, lambda: {"queue_depth": state.dispatcher.depth()})
    return Response(payload, media_type="text/plain; version=0.0.4")
