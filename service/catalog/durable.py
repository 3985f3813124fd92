"""The catalog's durable home (the records database) kept in step with Redis, by the API pods.

Redis is the fast path workers read; the database is what survives Redis losing everything while every
worker rolls. `CatalogKeeper` compares the two versions: a newer Redis catalog is copied into the
database (after every category write, and every `interval_s` for writes that bypass the API such as
`filo catalog import`); a Redis catalog that is missing or older than the database's is replaced by the
database's, with the version moved past both. Workers need no database: they pick up the restored
catalog as any other new version.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from descriptions import Category
from service.catalog.store import CatalogSnapshot, RedisCategoryStore
from service.core.telemetry import Metrics
from service.records.catalog_archive import ArchivedCatalog, CatalogArchive

log = logging.getLogger(__name__)


def to_archive(snap: CatalogSnapshot) -> ArchivedCatalog:
    return ArchivedCatalog(snap.version, {n: c.model_dump_json() for n, c in snap.categories.items()},
                           set(snap.deleted), {n: dict(k) for n, k in snap.extras.items()})


def from_archive(kept: ArchivedCatalog) -> CatalogSnapshot:
    return CatalogSnapshot(kept.version, {n: Category.model_validate_json(d) for n, d in kept.categories.items()},
                           set(kept.deleted), {n: dict(k) for n, k in kept.extras.items()})


class CatalogKeeper:
    def __init__(self, store: RedisCategoryStore, archive: CatalogArchive, metrics: Metrics,
                 interval_s: float) -> None:
        self.store = store
        self.archive = archive
        self.metrics = metrics
        self.interval_s = interval_s
        self._lock = asyncio.Lock()

    async def sync(self) -> str:
        """One comparison and the copy it calls for: 'saved', 'restored' or 'same'."""
        async with self._lock:
            published = await self.store.version()
            kept = await asyncio.to_thread(self.archive.version)
            if published > kept:
                snap = await self.store.snapshot()
                saved = await asyncio.to_thread(self.archive.save, to_archive(snap))
                return "saved" if saved else "same"
            if published < kept:
                return await self._restore(published)
            return "same"

    async def _restore(self, published: int) -> str:
        archived = await asyncio.to_thread(self.archive.load)
        if archived is None:
            return "same"
        version = await self.store.restore(from_archive(archived))
        if not version:
            return "same"
        self.metrics.catalog_restores.labels(source="database").inc()
        if published:
            self.metrics.catalog_regressions.inc()
            log.error("CATALOG VERSION WENT BACKWARDS in Redis (%d, the database holds %d): Redis lost the "
                      "catalog and something published an older one; restored %d categories from the database "
                      "as version %d", published, archived.version, len(archived.categories), version)
        else:
            log.warning("Redis holds no category catalog; restored %d categories from the database as version %d",
                        len(archived.categories), version)
        return "restored"

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self.sync()
                failures = 0
            except (RedisError, SQLAlchemyError, OSError) as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("catalog keeper: %s (attempt %d); trying again in %.0f s", exc, failures,
                                self.interval_s)
            await asyncio.sleep(self.interval_s)
