"""`filo serve`: the HTTP API under uvicorn, in queue mode (Redis + `filo worker`) or `--embedded`; with
`metrics_port` set, /metrics on a second listener of its own (which stops with the API's)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from service.cli.common import add_model_args, settings_from_args, setup_logging
from service.settings import FiloSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.backends.base import Backend

log = logging.getLogger("filo.serve")


def add_service_flags(p: argparse.ArgumentParser) -> None:
    """serve and worker: the model options every model command takes, plus the queue and the log level."""
    add_model_args(p)
    p.add_argument("--redis-url", help="FILO_REDIS_URL")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP API", description=__doc__)
    add_service_flags(p)
    p.add_argument("--host", help="FILO_HOST")
    p.add_argument("--port", type=int, help="FILO_PORT")
    p.add_argument("--embedded", action="store_true",
                   help="run the model in this process (micro-batched); no Redis, no workers")
    p.set_defaults(func=main)


async def _serve(app: FastAPI, backend: Backend, settings: FiloSettings, log_level: str) -> int:
    import uvicorn

    from service.api.app import create_metrics_app
    from service.api.server import SideServer, serve_config

    server = uvicorn.Server(serve_config(app, settings, log_level=log_level, timeout_graceful_shutdown=10))
    side = None
    if settings.metrics_port is not None:
        side = SideServer(serve_config(create_metrics_app(app), settings, port=settings.metrics_port,
                                       log_level=log_level, lifespan="off", timeout_graceful_shutdown=2))

    async def watch_fatal() -> None:
        """A model that cannot load (e.g. missing weights) must stop the process, not idle unready."""
        while not server.should_exit:
            if backend.fatal is not None:
                log.error("stopping: %s", backend.fatal)
                server.should_exit = True
                return
            await asyncio.sleep(0.2)

    loop = asyncio.get_running_loop()
    watcher = loop.create_task(watch_fatal())
    metrics = loop.create_task(side.serve()) if side is not None else None
    try:
        await server.serve()
    finally:
        watcher.cancel()
        if side is not None and metrics is not None:
            side.should_exit = True
            await metrics
    return 2 if backend.fatal is not None else 0


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend
    from service.backends.redis_queue import RedisBackend
    from service.core.security import AuthConfigError

    setup_logging(args.log_level)
    try:
        settings = settings_from_args(args)
    except (ValidationError, SettingsError) as exc:  # a value of the wrong shape: say which, no traceback
        print(f"filo serve: {exc}", file=sys.stderr)
        return 2
    embedded = args.embedded or not settings.redis_url
    backend = EmbeddedBackend(settings) if embedded else RedisBackend(settings)
    try:
        app = create_app(settings, backend)
    except AuthConfigError as exc:
        print(f"filo serve: {exc}", file=sys.stderr)
        return 2
    log.info("serving on http://%s:%d (%s mode, %s profile)", settings.host, settings.port, backend.mode,
             settings.profile)
    if settings.metrics_port is not None:
        log.info("/metrics on http://%s:%d only", settings.host, settings.metrics_port)
    return asyncio.run(_serve(app, backend, settings, args.log_level))
