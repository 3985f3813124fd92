"""The interface the routes use: everything a route needs from the service is declared on `Backend`, and
the two implementations (`embedded`: the engine in this process; `redis_queue`: workers behind Redis)
provide it. Routes never reach past it."""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from descriptions import Category
from service.backends.jobs import JobStore
from service.catalog.thresholds import ThresholdRule
from service.core.imaging import Heatmap, HeatmapSpec
from service.core.telemetry import Metrics
from service.core.types import InspectResult
from service.records.recorder import Records

log = logging.getLogger(__name__)


@dataclass
class InspectJob:
    """One validated request: its original bytes, and the decoded image where this process decodes
    (embedded; `Backend.decodes_in_process`). Queue mode leaves decoding to the worker: one decode."""

    request_id: str
    category: str
    image: np.ndarray | None
    image_bytes: bytes
    top_k: int
    grounding: bool | None
    heatmap: HeatmapSpec
    deadline: float  # time.monotonic() by which an answer is due
    want_map: bool = False  # also return the map itself (queue mode: compact, see service/queue/protocol.py)


@dataclass
class InspectOutcome:
    result: InspectResult
    model: dict[str, Any]
    queue_wait_ms: float
    model_ms: float
    heatmap: Heatmap | None = None  # rendered as the job's HeatmapSpec asked


@dataclass
class CategoryApplied:
    """Who has built a registered category's caches when PUT answers (queue mode counts workers)."""

    workers_ready: int | None = None
    workers_live: int | None = None


@dataclass
class Readiness:
    ready: bool
    detail: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    mode: str
    decodes_in_process: bool  # True: the route hands over decoded pixels; False: validated bytes only
    metrics: Metrics
    fatal: BaseException | None
    records: Records | None  # inspection records (None: FILO_RECORDS=false)
    jobs: JobStore  # background jobs (learn), readable from every API process

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def readiness(self) -> Readiness: ...
    async def inspect(self, job: InspectJob) -> InspectOutcome: ...
    async def list_categories(self) -> list[Category]: ...
    async def put_category(self, category: Category) -> CategoryApplied: ...
    async def put_extra(self, name: str, kind: str, data: bytes) -> CategoryApplied: ...
    async def get_extra(self, name: str, kind: str) -> bytes | None: ...
    def category_lock(self, name: str) -> AbstractAsyncContextManager[None]:
        """Held by every change of a category's references or threshold, across all API processes, so that a
        change and the history entry it writes are one step (the entry's `previous` is the last one's value)."""
        ...

    async def threshold_rule(self, name: str) -> ThresholdRule:
        """The category's decision rule as its next inspection applies it (threshold, source, review margin)."""
        ...
    async def reference_memory_bytes(self, name: str) -> int: ...
    async def delete_category(self, name: str) -> None: ...
    async def refresh_gauges(self) -> None: ...


