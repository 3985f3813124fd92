"""`filo worker`: load the model once and answer requests from the Redis stream in batches."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from service.cli.common import settings_from_args, setup_logging
from service.cli.serve_cmd import add_service_flags
from service.settings import FiloSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="run an inspection worker (needs Redis)", description=__doc__)
    add_service_flags(p)
    p.add_argument("--metrics-host", help="FILO_WORKER_METRICS_HOST (default 0.0.0.0)")
    p.add_argument("--metrics-port", type=int, help="FILO_WORKER_METRICS_PORT (/healthz /readyz /metrics)")
    p.set_defaults(func=main)


async def _run(settings: FiloSettings) -> int:
    from service.worker.loop import Worker, run_worker

    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)  # finish the batch in hand, then leave
    return await run_worker(worker, settings.worker_metrics_host, settings.worker_metrics_port)


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    settings = settings_from_args(args, worker_metrics_port=args.metrics_port, worker_metrics_host=args.metrics_host)
    if not settings.redis_url:
        print("filo worker: set FILO_REDIS_URL or --redis-url (or use `filo serve --embedded`)", file=sys.stderr)
        return 2
    return asyncio.run(_run(settings))
