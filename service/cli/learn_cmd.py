"""`filo learn CATEGORY [--dry-run]`: turn the category's reviewed records into references, a threshold and
suggested descriptions, on this machine: the same workflow as `POST /v1/categories/{name}/learn`
(service/workflows/learn.py), with the backend the settings name.

Queue mode (FILO_REDIS_URL set): the workers score the kept images and apply the result at once, like the API.
Embedded mode: the model runs in this process over `state_dir` (FILO_STATE_DIR) and its records database; a
`filo serve --embedded` already running over the same state reads the new references and threshold only when it
restarts, so run this while it is stopped, or use the API. Prints the result as JSON; exit 1 when the category
or the records cannot be used, 2 when the model cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.cli.common import add_model_args, settings_from_args, setup_logging
from service.settings import FiloSettings

READY_TIMEOUT_S = 600.0  # the model's start on a CPU, caches included


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("learn", help="learn references and a threshold from reviewed records",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("category")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing (scores nothing)")
    p.add_argument("--state-dir", type=Path, default=None, help="FILO_STATE_DIR (embedded mode's categories, "
                   "references and records)")
    p.add_argument("--redis-url", help="FILO_REDIS_URL: queue mode (the workers score)")
    add_model_args(p)
    p.set_defaults(func=main)


async def _learn(settings: FiloSettings, category: str, dry_run: bool) -> dict[str, Any]:
    from service.backends.embedded import EmbeddedBackend
    from service.backends.redis_queue import RedisBackend
    from service.workflows.learn import learn

    backend = RedisBackend(settings) if settings.redis_url else EmbeddedBackend(settings)
    await backend.start()
    try:
        await _wait_ready(backend)
        return await learn(backend, settings, category, f"cli:{getpass.getuser()}", dry_run)
    finally:
        await backend.stop()


async def _wait_ready(backend: Any) -> None:
    """The model loaded (embedded) and the records database migrated, or the reason it cannot be."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if backend.fatal is not None:
            raise RuntimeError(f"the engine failed to start: {backend.fatal}")
        model_ready = backend.mode != "embedded" or backend.engine is not None
        if model_ready and (backend.records is None or backend.records.ready):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"not ready after {READY_TIMEOUT_S:.0f} s")


def main(args: argparse.Namespace) -> int:
    from service.core.errors import ServiceError

    setup_logging("warning")
    extra = {"state_dir": args.state_dir} if args.state_dir else {}
    settings = settings_from_args(args, **extra)
    try:
        result = asyncio.run(_learn(settings, args.category, args.dry_run))
    except ServiceError as exc:
        print(f"filo learn: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError) as exc:
        print(f"filo learn: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
