"""In-process micro-batching for `filo serve --embedded`: up to N requests or T ms, one engine call.

The engine is not thread-safe and a batch of 8 costs about as much as a batch of 1 on a GPU, so
requests from concurrent HTTP handlers are collected into one batch (up to `max_batch_size`, or
whatever arrived `max_wait_ms` after the first) and the batch runs on ONE dedicated thread, so
the event loop keeps answering health checks and accepting requests meanwhile. Anything else
that touches the engine (category registration, cache builds) goes through `run_exclusive`,
on that same thread, so it never overlaps a batch.

The batcher is generic over the batch function; it knows nothing of images or models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.core.errors import DeadlineExceededError, QueueFullError, UnavailableError
from service.core.retry_after import QueueWaitEstimate

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BatchFn = Callable[[list[T]], Sequence[Any]]


def run_isolated(batch_fn: BatchFn, items: list[T]) -> list[Any]:
    """Run a batch; if the whole call raises, re-run each item alone so only the culprit fails.

    The engine promises a per-slot error instead of raising, but a bug or a CUDA fault must still
    not fail the neighbours of the request that caused it. Returns one result or exception per item.
    """
    try:
        results = list(batch_fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results
    except Exception as exc:  # isolating failures is the point
        if len(items) == 1:
            return [exc]
        log.exception("batch of %d failed as a whole; re-running its requests one by one", len(items))
    out: list[Any] = []
    for item in items:
        try:
            single = list(batch_fn([item]))
            out.append(single[0] if len(single) == 1 else RuntimeError("batch function lost the result"))
        except Exception as exc:
            out.append(exc)
    return out


@dataclass
class Completed(Generic[R]):
    """What one submitted item got: its result (or the exception in its slot) and its timings."""

    value: Any
    queue_wait_s: float
    run_s: float
    batch_size: int


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float
    deadline: float


BatchObserver = Callable[[int, float, list[float]], None]


class MicroBatcher(Generic[T]):
    """Collects submitted items into batches and runs them on one thread, in order of arrival."""

    def __init__(
        self,
        batch_fn: BatchFn,
        *,
        max_batch_size: int,
        max_wait_ms: int,
        max_depth: int,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self._batch_fn = batch_fn
        self._max_batch = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_depth)
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="filo-engine")
        self._task: asyncio.Task | None = None
        self._running = 0
        self.waits = QueueWaitEstimate()

    @property
    def depth(self) -> int:
        """Items waiting plus items in the batch now running."""
        return self._queue.qsize() + self._running

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="filo-batcher")

    async def stop(self) -> None:
        """Stop batching; whatever still waits is answered 503, never left hanging."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            p = self._queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(UnavailableError("shutting_down", "the server is shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=False)

    async def run_exclusive(self, fn: Callable[..., R], *args: Any) -> R:
        """Run `fn(*args)` on the batch thread, between batches (engine access is single-threaded)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, item: T, deadline: float) -> Completed:
        """Queue `item`; wait for its slot's result until `deadline` (a `time.monotonic()` value).

        Raises QueueFullError (429) when `max_depth` items already wait and DeadlineExceededError
        (504) when the deadline passes; an item whose caller gave up is skipped, not run.
        """
        if self._task is None:
            raise UnavailableError("not_ready", "the batcher is not running")
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), time.monotonic(), deadline)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFullError(f"{self._queue.maxsize} requests already queued",
                                 self.waits.retry_after_s()) from None
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), max(0.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.TimeoutError):
            pending.future.cancel()
            raise DeadlineExceededError() from None
        except asyncio.CancelledError:
            pending.future.cancel()  # the client went away: do not run it
            raise

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        until = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except (TimeoutError, asyncio.TimeoutError):
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            now = time.monotonic()
            live = []
            for p in batch:
                if p.future.done():
                    continue  # its caller gave up (deadline or disconnect)
                if now >= p.deadline:
                    p.future.set_exception(DeadlineExceededError("deadline passed while queued; not run"))
                    continue
                live.append(p)
            if not live:
                continue
            self._running = len(live)
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(
                    self._executor, run_isolated, self._batch_fn, [p.item for p in live]
                )
            except Exception as exc:
                results = [exc] * len(live)
            finally:
                self._running = 0
            run_s = time.monotonic() - started
            waits = [started - p.enqueued for p in live]
            for wait in waits:
                self.waits.observe(wait)
            if self._on_batch is not None:
                try:
                    self._on_batch(len(live), run_s, waits)
                except Exception:  # metrics must never stop batching
                    log.exception("batch observer failed")
            for p, value, wait in zip(live, results, waits):
                if not p.future.done():
                    p.future.set_result(Completed(value, wait, run_s, len(live)))
