"""The FastAPI application factory: one settings object and one backend in, an app out.

Everything the routes use hangs off `app.state` (see deps.py), so tests can build several apps
side by side. The backend starts in the lifespan; loading happens in the background so /healthz
answers at once while /readyz waits for the model. With `metrics_port` set, /metrics is not the API app's:
`create_metrics_app` serves it on a listener of its own (`filo serve` runs both); with `api_docs` off there
is no /docs, /redoc or /openapi.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import __doc__ as ERRORS_DOC
from service.api.errors import install_error_handlers
from service.api.routes import categories, console, health, inspect, inspections, jobs, learning, references
from service.backends.base import Backend
from service.core.errors import error_body
from service.core.security import Authenticator, check_auth_config
from service.core.telemetry import Metrics
from service.settings import FiloSettings
from service.workflows.inspection import Sinks, default_sinks

API_VERSION = "1.0.0"
NOSNIFF = (b"x-content-type-options", b"nosniff")


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, enforced as the body streams in (never read whole first).

    A declared Content-Length over the limit is refused before reading anything; a chunked or
    lying body is cut off at the first chunk past the limit: the client gets the 413 and the app
    sees a disconnect, so it stops reading.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def _reject(self, send: Send) -> None:
        self.metrics.error("body_too_large")
        body = json.dumps(error_body("body_too_large", f"request body exceeds {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        received = 0
        state = {"started": False, "rejected": False}

        async def limited_receive() -> Message:
            nonlocal received
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    state["rejected"] = True
                    if not state["started"]:
                        state["started"] = True
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["rejected"]:
                return  # the 413 went out already; whatever the app says now is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


class NoSniffMiddleware:
    """`X-Content-Type-Options: nosniff` on every response, so no browser reads a JSON body (which may
    echo client text) as anything but its declared type. The 500 handler sets it itself: its answer
    comes from Starlette's outermost middleware, outside this one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-content-type-options" for name, _ in headers):
                    headers.append(NOSNIFF)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_wrapper)


class MetricsMiddleware:
    """Duration, count and in-flight gauge of every HTTP request, labelled by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            code = str(status["code"])
            self.metrics.http_duration.labels(label, scope.get("method", ""), code).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(label, code).inc()


def create_app(settings: FiloSettings, backend: Backend, sinks: Sinks | None = None) -> FastAPI:
    """Build the app; raises AuthConfigError for a production service without API keys. `sinks` get every
    finished inspection (service/core/finished.py); by default the records, where the backend keeps them."""
    check_auth_config(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    docs = settings.api_docs
    app = FastAPI(
        title="FiLo Inspect",
        version=API_VERSION,
        description="Zero-shot anomaly detection and localisation (FiLo) as a service.\n\n" + (ERRORS_DOC or ""),
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.settings = settings
    app.state.backend = backend
    app.state.metrics = backend.metrics
    app.state.auth = Authenticator(settings)
    app.state.sinks = sinks if sinks is not None else default_sinks(backend, settings)
    install_error_handlers(app)
    app.include_router(inspect.router)
    app.include_router(categories.router)
    app.include_router(references.router)
    app.include_router(inspections.router)
    app.include_router(learning.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    if settings.metrics_port is None:
        app.include_router(health.metrics_router)
    app.include_router(console.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=backend.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    app.add_middleware(MetricsMiddleware, metrics=backend.metrics)
    app.add_middleware(NoSniffMiddleware)
    return app


def create_metrics_app(app: FastAPI) -> FastAPI:
    """/metrics alone, for the listener on `metrics_port`: the API app's backend, metrics and key check, no
    lifespan of its own (the API app starts and stops the backend)."""
    side = FastAPI(title="FiLo Inspect metrics", openapi_url=None, docs_url=None, redoc_url=None)
    for name in ("settings", "backend", "metrics", "auth"):
        setattr(side.state, name, getattr(app.state, name))
    install_error_handlers(side)
    side.include_router(health.metrics_router)
    side.add_middleware(NoSniffMiddleware)
    return side
