"""Liveness, readiness and Prometheus metrics (no API key: probed by the orchestrator and Prometheus).

/metrics is open unless `metrics_key` is set (then Prometheus presents it as a bearer key), and it is served
by the API app, or, with `metrics_port` set, by a listener of its own (`service.api.app.create_metrics_app`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from service.api.auth import require_metrics_key
from service.api.deps import BackendDep, MetricsDep
from service.api.schemas import ERROR_RESPONSES, HealthOut, ReadyOut

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    """The process is alive and its event loop answers (even while the model loads)."""
    return HealthOut()


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def readyz(backend: BackendDep) -> JSONResponse:
    """Ready when a request would be served now: the model loaded, warmed and its caches built
    (embedded); Redis reachable, categories published and a worker heartbeat live (queue mode).
    `detail` says which part is missing, and which cache was used."""
    state = await backend.readiness()
    body = ReadyOut(ready=state.ready, mode=backend.mode, detail=state.detail)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if state.ready else 503)


@metrics_router.get("/metrics", response_class=Response, responses={401: ERROR_RESPONSES[401]},
                    dependencies=[Depends(require_metrics_key)])
async def metrics(backend: BackendDep, registry: MetricsDep) -> Response:
    """Prometheus text format; a bearer key only where `metrics_key` is set."""
    await backend.refresh_gauges()
    data, content_type = registry.render()
    return Response(data, media_type=content_type)
