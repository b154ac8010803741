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
    """Redis reachable, at least one worker with its model loaded (a worker counts while its
    heartbeat is under ``WORKER_SILENT_S`` old), bank open. A 503 names what is failing."""
    job_store = state.store.ping()
    try:
        workers = state.workers_ready() if job_store else 0
    except Exception:  # the job store went away between the two questions
        job_store, workers = False, 0
    checks = {"mode": state.mode, "preset": state.settings.preset,
              "placement": state.settings.placement.label, "job_store": job_store,
              "workers": workers, "bank_clips": state.bank.index_size}  # fmt: skip
    failing = [name for name, ok in (("job_store", job_store), ("workers", workers > 0)) if not ok]
    body = Health(status="unavailable" if failing else "ok", checks=checks, failing=failing)
    return JSONResponse(body.model_dump(), status_code=503 if failing else 200)


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    """Prometheus text format: queue depth, job and step durations, retrieval latency, errors.
    With the job store unreachable it shows what this process can still read."""

    def gauges() -> dict[str, dict[str, float]]:
        try:
            return {"queue_depth": state.dispatcher.depth()}
        except Exception:  # Redis away: no queue depth this scrape
            return {}

    payload = render(state.metrics, gauges)
    return Response(payload, media_type="text/plain; version=0.0.4")
