"""A worker's heartbeat: the proof of life API pods count and other workers watch.

It beats every `heartbeat_interval_ms` from a task of its own, so a long batch does not make the worker look
dead, for as long as the worker is idle or its batch has run for less than a request's whole deadline: a batch
stuck longer serves nobody, so its worker stops counting, and another takes its requests over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from service.queue.consumer import Consumer


def should_beat(batch_started: float | None, now: float, deadline_s: float) -> bool:
    """Alive while idle or while the running batch is younger than a request's whole deadline."""
    return batch_started is None or now - batch_started < deadline_s


async def beat_until(stopping: asyncio.Event, consumer: Consumer, batch_started: Callable[[], float | None],
                     interval_s: float, deadline_s: float) -> None:
    """Beat until `stopping` is set; a Redis outage skips beats (the worker's loop reports and waits it out)."""
    while not stopping.is_set():
        if should_beat(batch_started(), time.monotonic(), deadline_s):
            with contextlib.suppress(RedisError):
                await consumer.heartbeat()
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval_s)
