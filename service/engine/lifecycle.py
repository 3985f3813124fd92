"""An engine's start-up and its caches: restore what persisted, apply the catalog, warm up, persist again; and
the factory that builds an engine from the settings (torch is imported only when it is called). The persisted
prompt cache is named by `service.core.keys.cache_key`, the one function that keys the caches.

The functions take the engine as it is (its catalog, caches and warm-up), so that this module needs no torch
and the catalog stores below it know nothing of engines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from descriptions import Category
from service.catalog.store import CacheStore, CategoryStore, pack_cache_state, unpack_cache_state
from service.core.keys import cache_key
from service.engine.contract import Engine, EngineFactory
from service.settings import FiloSettings

log = logging.getLogger(__name__)

__all__ = ["EngineFactory", "StartReport", "apply_categories", "default_engine_factory", "persist_caches",
           "start_engine"]


def default_engine_factory(settings: FiloSettings) -> Engine:
    try:
        from service.engine.pipeline import InspectionEngine  # torch: only processes that run the model import it
    except ImportError as exc:  # the slim API install has no torch
        raise RuntimeError(f"running the model needs the 'model' extra (pip install 'filo-inspect[model]'): {exc}") from exc

    return InspectionEngine.from_settings(settings)


def apply_categories(engine: Engine, wanted: dict[str, Category], prepare: bool = True) -> list[str]:
    """Make the engine's catalog equal `wanted`; with `prepare`, build every category's caches.

    Runs on the engine's thread (the engine is single-threaded). Returns the names added or changed.
    """
    catalog = engine.catalog
    for name in catalog.names():
        if name not in wanted:
            catalog.remove(name)
    changed = []
    for name, category in sorted(wanted.items()):
        if name not in catalog or catalog.get(name) != category:
            catalog.register(category)
            changed.append(name)
        if prepare:
            engine.prepare_category(name)
    return changed


@dataclass
class StartReport:
    """What start-up did and what runs; /readyz shows it, and the tests assert a restart used the persisted cache.

    `runtime`: the implementation of each expensive part (service/engine/runtime.py: device, precision, encoder,
    CUDA graphs, Grounding DINO compiled or eager, its deformable attention, and any warnings).
    """

    cache_source: str  # "persisted" (loaded from the store) or "built"
    cache_entries_loaded: int
    categories: int
    categories_version: int
    seconds: float
    runtime: dict[str, Any] = field(default_factory=dict)


Run = Callable[..., Awaitable[Any]]


async def start_engine(engine: Engine, store: CategoryStore, caches: CacheStore, run: Run) -> StartReport:
    """Restore caches, seed and apply categories, warm up, persist caches; `run` calls onto the engine thread."""
    t0 = time.monotonic()
    await store.seed([engine.catalog.get(n) for n in engine.catalog.names()])
    version = await store.version()
    wanted = await store.all()
    await run(apply_categories, engine, wanted, False)
    key = cache_key(engine.model_info())
    loaded = 0
    blob = await caches.load(key)
    if blob:
        try:
            loaded = int(await run(engine.load_cache_state, unpack_cache_state(blob)) or 0)
        except Exception:  # a bad cache costs a rebuild, never the start
            log.exception("persisted prompt cache %s unusable; rebuilding", key)
    await run(apply_categories, engine, wanted, True)
    if engine.catalog.names():  # nothing to warm up with when every category was deleted
        await run(engine.warmup)
    await _save_quietly(caches, key, pack_cache_state(await run(engine.cache_state)))
    runtime = await run(engine.runtime)
    report = StartReport("persisted" if loaded else "built", loaded, len(wanted), version, time.monotonic() - t0,
                         runtime)
    log.info("engine ready: %s", report)
    for warning in runtime.get("warnings", ()):
        log.warning("engine ready with a slow path: %s", warning)
    return report


async def persist_caches(engine: Engine, caches: CacheStore, run: Run) -> None:
    """Save the engine's caches again (after a category was registered)."""
    key = cache_key(engine.model_info())
    await _save_quietly(caches, key, pack_cache_state(await run(engine.cache_state)))


async def _save_quietly(caches: CacheStore, key: str, data: bytes) -> None:
    """Persisting caches is an optimisation: a read-only disk costs the next start a rebuild, nothing more."""
    try:
        await caches.save(key, data)
    except OSError as exc:
        log.warning("could not persist the prompt cache %s (%s); the next start rebuilds it", key, exc)
