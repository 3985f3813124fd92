"""Where the category list and the per-category prompt caches outlive a process.

Categories: with Redis, one hash `<stream>:categories` (name -> Category JSON), a set of deleted
names, and a version counter bumped on every change. Workers (and the embedded server) seed the
bundled categories once (`HSETNX`, skipping deleted names), after which the store is the source of
truth: a PUT on any API process lands in Redis, and each worker compares the version before every
batch and applies the difference to its engine. Without Redis, the same structure lives in a JSON
file in `state_dir` so registrations survive a restart.

Caches: the engine's `cache_state()` (prompt banks per category, keyed by content) is saved under
a key naming the model, in Redis or as a file, so a restarted pod skips rebuilding them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis

from descriptions import Category
from service.queue import Keys

log = logging.getLogger(__name__)

_SEED_LUA = """
-- KEYS[1] categories hash, KEYS[2] deleted set, KEYS[3] version; ARGV name/json pairs
local added = 0
for i = 1, #ARGV, 2 do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then
    added = added + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if added > 0 or redis.call('EXISTS', KEYS[3]) == 0 then redis.call('INCR', KEYS[3]) end
return tonumber(redis.call('GET', KEYS[3]))
"""


def default_state_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "filo-inspect"


class CategoryStore(Protocol):
    async def version(self) -> int: ...
    async def all(self) -> dict[str, Category]: ...
    async def put(self, category: Category) -> int: ...
    async def delete(self, name: str) -> bool: ...
    async def seed(self, categories: list[Category]) -> int: ...


class CacheStore(Protocol):
    async def load(self, key: str) -> bytes | None: ...
    async def save(self, key: str, data: bytes) -> None: ...


class RedisCategoryStore:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._seed = redis.register_script(_SEED_LUA)

    async def version(self) -> int:
        return int(await self.redis.get(self.keys.categories_version) or 0)

    async def all(self) -> dict[str, Category]:
        raw = await self.redis.hgetall(self.keys.categories)
        return {k.decode(): Category.model_validate_json(v) for k, v in raw.items()}

    async def put(self, category: Category) -> int:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.categories, category.name, category.model_dump_json())
        pipe.srem(self.keys.categories_deleted, category.name)
        pipe.incr(self.keys.categories_version)
        return int((await pipe.execute())[-1])

    async def delete(self, name: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.keys.categories, name)
        pipe.sadd(self.keys.categories_deleted, name)
        pipe.incr(self.keys.categories_version)
        return bool((await pipe.execute())[0])

    async def seed(self, categories: list[Category]) -> int:
        args: list[str] = []
        for c in categories:
            args += [c.name, c.model_dump_json()]
        keys = [self.keys.categories, self.keys.categories_deleted, self.keys.categories_version]
        return int(await self._seed(keys=keys, args=args))


class FileCategoryStore:
    """The Redis structure in one JSON file, written atomically (write a temp file, then rename).

    The state is kept in memory and written through; if the disk refuses (read-only root
    filesystem), the process keeps working from memory and only the persistence is lost.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._state: dict | None = None

    def _read(self) -> dict:
        if self._state is None:
            try:
                self._state = json.loads(self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                self._state = {"version": 0, "categories": {}, "deleted": []}
        return self._state

    def _write(self, state: dict) -> None:
        self._state = state
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".categories-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f, ensure_ascii=False, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not persist categories to %s (%s); they last until this process exits",
                        self.path, exc)

    async def version(self) -> int:
        return int(self._read()["version"])

    async def all(self) -> dict[str, Category]:
        return {k: Category.model_validate(v) for k, v in self._read()["categories"].items()}

    async def put(self, category: Category) -> int:
        state = self._read()
        state["categories"][category.name] = category.model_dump(mode="json")
        state["deleted"] = [n for n in state["deleted"] if n != category.name]
        state["version"] += 1
        self._write(state)
        return state["version"]

    async def delete(self, name: str) -> bool:
        state = self._read()
        existed = state["categories"].pop(name, None) is not None
        state["deleted"] = sorted(set(state["deleted"]) | {name})
        state["version"] += 1
        self._write(state)
        return existed

    async def seed(self, categories: list[Category]) -> int:
        state = self._read()
        added = 0
        for c in categories:
            if c.name not in state["deleted"] and c.name not in state["categories"]:
                state["categories"][c.name] = c.model_dump(mode="json")
                added += 1
        if added or state["version"] == 0:
            state["version"] += 1
            self._write(state)
        return state["version"]


class RedisCacheStore:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def load(self, key: str) -> bytes | None:
        return await self.redis.get(self.keys.cache(key))

    async def save(self, key: str, data: bytes) -> None:
        await self.redis.set(self.keys.cache(key), data)


class DiskCacheStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
        return self.directory / f"cache-{safe}.bin"

    async def load(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    async def save(self, key: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".cache-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self._path(key))


# --- start-up: restore what persisted, build the rest, persist again --------------------------------------


def pack_cache_state(state: dict[str, bytes]) -> bytes:
    """Frame the engine's {key: blob} cache as JSON index + blobs (no pickle: the store is shared)."""
    index, offset, blobs = {}, 0, []
    for key, blob in state.items():
        index[key] = [offset, len(blob)]
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(index).encode()
    return len(head).to_bytes(8, "big") + head + b"".join(blobs)


def unpack_cache_state(data: bytes) -> dict[str, bytes]:
    n = int.from_bytes(data[:8], "big")
    index = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    return {key: bytes(body[off:off + length]) for key, (off, length) in index.items()}


def model_cache_key(model_info: dict) -> str:
    """Caches are only valid for the model that built them: key them by its whole description."""
    digest = hashlib.sha256(json.dumps(model_info, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{model_info.get('name', 'model')}-{digest}"


def apply_categories(engine: Any, wanted: dict[str, Category], prepare: bool = True) -> list[str]:
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
    """What start-up did; /readyz shows it, and the tests assert a restart used the persisted cache."""

    cache_source: str  # "persisted" (loaded from the store) or "built"
    cache_entries_loaded: int
    categories: int
    categories_version: int
    seconds: float


Run = Callable[..., Awaitable[Any]]


async def start_engine(engine: Any, store: CategoryStore, caches: CacheStore, run: Run) -> StartReport:
    """Restore caches, seed and apply categories, warm up, persist caches; `run` calls onto the engine thread."""
    t0 = time.monotonic()
    await store.seed([engine.catalog.get(n) for n in engine.catalog.names()])
    version = await store.version()
    wanted = await store.all()
    await run(apply_categories, engine, wanted, False)
    key = model_cache_key(engine.model_info())
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
    report = StartReport("persisted" if loaded else "built", loaded, len(wanted), version, time.monotonic() - t0)
    log.info("engine ready: %s", report)
    return report


async def persist_caches(engine: Any, caches: CacheStore, run: Run) -> None:
    """Save the engine's caches again (after a category was registered)."""
    key = model_cache_key(engine.model_info())
    await _save_quietly(caches, key, pack_cache_state(await run(engine.cache_state)))


async def _save_quietly(caches: CacheStore, key: str, data: bytes) -> None:
    """Persisting caches is an optimisation: a read-only disk costs the next start a rebuild, nothing more."""
    try:
        await caches.save(key, data)
    except OSError as exc:
        log.warning("could not persist the prompt cache %s (%s); the next start rebuilds it", key, exc)
