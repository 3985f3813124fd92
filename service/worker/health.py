"""A worker's own HTTP face: /healthz, /readyz and /metrics for probes and Prometheus (no auth), served by
uvicorn beside the batch loop on `worker_metrics_port`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from service.core.keys import Keys
from service.core.telemetry import Metrics
from service.engine.lifecycle import StartReport
from service.worker.catalog_follower import CatalogFollower


class WorkerState(Protocol):
    """What the health app reads of a worker (service/worker/loop.py `Worker`)."""

    name: str
    engine: Any
    fatal: BaseException | None
    redis_ok: bool
    batches: int
    report: StartReport | None
    catalog: CatalogFollower
    metrics: Metrics
    redis: Any
    keys: Keys


def health_app(worker: WorkerState) -> FastAPI:
    app = FastAPI(title="FiLo Inspect worker", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = worker.engine is not None and worker.redis_ok and worker.fatal is None
        detail: dict[str, Any] = {"worker": worker.name, "redis": "ok" if worker.redis_ok else "unreachable",
                                  "batches": worker.batches, "catalog_republished": worker.catalog.republished}
        if worker.report is not None:
            detail.update(worker.report.__dict__)
        if worker.fatal is not None:
            detail["error"] = str(worker.fatal)
        return JSONResponse({"ready": ready, "mode": "worker", "detail": detail}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        with contextlib.suppress(RedisError):
            worker.metrics.queue_depth.set(await worker.redis.xlen(worker.keys.stream))
        data, ctype = worker.metrics.render()
        return Response(data, media_type=ctype)

    return app


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the worker decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
