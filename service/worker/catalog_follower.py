"""A worker's copy of the category catalog: followed, applied to its engine, and healed.

Before each batch the worker asks `sync`: if the categories version in Redis moved, the difference is applied
to the engine (new categories' caches built and persisted), with the catalog's normal references and
thresholds; then what that built is published (each category's memory size and decision rule,
service/catalog/references.py `publish_applied`) and, last, the version applied is reported, so an API pod
that waits for the workers after a write reads the rule the next inspection gets.

Healing: if the version in Redis disappears (Redis restarted empty, FLUSHALL) or goes backwards (an older
catalog was published), the worker re-publishes the catalog it last applied (`CatalogSnapshot`) and its prompt
caches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from service.catalog.references import install_extras, plan_extras, publish_applied
from service.catalog.store import CatalogSnapshot, RedisCacheStore, RedisCategoryStore
from service.core.keys import Keys
from service.core.telemetry import Metrics
from service.engine.contract import Engine
from service.engine.lifecycle import apply_categories, persist_caches
from service.queue.consumer import Consumer

log = logging.getLogger(__name__)

RunOnEngine = Callable[..., Awaitable[Any]]


class CatalogFollower:
    def __init__(self, redis: Any, keys: Keys, consumer: Consumer, metrics: Metrics, run: RunOnEngine) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self.metrics = metrics
        self.run = run  # onto the engine's thread
        self.store = RedisCategoryStore(redis, keys)
        self.caches = RedisCacheStore(redis, keys)
        self.engine: Engine | None = None
        self.version = -1
        self.republished = 0  # times this worker re-published the catalog into an emptied Redis
        self._snapshot: CatalogSnapshot | None = None

    async def start(self, engine: Engine, version: int) -> None:
        """Right after the engine started on catalog `version`: its references and thresholds, then report."""
        self.engine = engine
        self.version = version
        self._snapshot = await self.store.snapshot()
        await self._apply_extras(self._snapshot.extras)
        await self.consumer.report_applied(version)

    async def sync(self) -> None:
        assert self.engine is not None
        version = await self.store.version()
        if version == self.version:
            return
        if version == 0 and self._snapshot is not None:
            await self._republish()
            return
        if 0 < version < self.version and self._snapshot is not None:
            self.metrics.catalog_regressions.inc()
            log.error("CATALOG VERSION WENT BACKWARDS in Redis (%d, this worker applied %d): Redis lost the catalog "
                      "and an older one was published; re-publishing the one applied here", version, self.version)
            await self._republish()
            return
        snap = await self.store.snapshot()
        changed = await self.run(apply_categories, self.engine, snap.categories)
        await self._apply_extras(snap.extras)
        if changed:
            log.info("categories changed (version %d): %s", snap.version, ", ".join(changed))
            await persist_caches(self.engine, self.caches, self.run)
        self._snapshot = snap
        self.version = snap.version
        await self.consumer.report_applied(snap.version)

    async def _apply_extras(self, extras: dict[str, dict[str, bytes]]) -> None:
        """The catalog's normal references and thresholds onto the engine, and what that built published.
        A catalog change that lands meanwhile is applied by the next `sync` (its version is still newer)."""
        assert self.engine is not None
        # the memories of changed references are built beside the batches, then swapped in between two of them:
        # other categories' inspections go on meanwhile
        plan = await asyncio.to_thread(plan_extras, self.engine, extras)
        sizes = await self.run(install_extras, self.engine, plan)
        rules = await self.run(self.engine.references.rules)
        await publish_applied(self.redis, self.keys, sizes, rules)

    async def _republish(self) -> None:
        """Redis holds no catalog any more: publish the last one applied here, and the prompt caches."""
        assert self._snapshot is not None and self.engine is not None
        version = await self.store.restore(self._snapshot)
        if version:
            self.republished += 1
            self.metrics.catalog_restores.labels(source="worker").inc()
            log.warning("Redis lost the category catalog; re-published %d categories from this worker "
                        "(version %d)", len(self._snapshot.categories), version)
            await persist_caches(self.engine, self.caches, self.run)
        await self.sync()  # another worker may have won the race: apply whatever is there now
