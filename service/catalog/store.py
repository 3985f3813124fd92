"""Where the category list and the per-category prompt caches outlive a process.

Categories: with Redis, one hash `<stream>:categories` (name -> Category JSON), a set of deleted
names, and a version counter bumped on every change. Workers (and the embedded server) seed the
bundled categories once (`HSETNX`, skipping deleted names), after which the store is the source of
truth: a PUT on any API process lands in Redis, and each worker compares the version before every
batch and applies the difference to its engine. Without Redis, the same structure lives in a JSON
file in `state_dir` so registrations survive a restart.

Caches: the engine's `cache_state()` (prompt banks per category, keyed by content) is saved under
a key naming the model, in Redis or as a file, so a restarted pod skips rebuilding them.

Healing: every worker keeps a `CatalogSnapshot` of what the store held when it last applied a
version (categories, deleted names, per-category extras). If Redis comes back empty (a restart
without persistence, FLUSHALL), the version key is gone; the first worker to notice `restore`s its
snapshot in one atomic step (only while the published version is older than the snapshot's, so racing
workers cannot clobber each other or a newer catalog), with the version moved past the old one, and
re-saves its caches. A version that went backwards (a new worker published the bundled categories into
the emptied Redis first) is healed the same way, loudly. The durable copy in the records database
(`service/catalog/durable.py`) covers the case where no worker holds a snapshot any more.
Writes (PUT/DELETE, `filo catalog import`) are refused while no catalog is published, so nothing
can half-publish a catalog holding only the category just written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis

from descriptions import Category
from service.catalog.references import EXTRA_KINDS
from service.core.files import write_private
from service.core.keys import Keys

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


# Per-category data stored beside a category's descriptions (one Redis string per category and kind, at
# `Keys.category_extra(name, kind)`), included in every snapshot, restored with the category and deleted with
# it: the kinds service/catalog/references.py defines (normal reference images and the threshold record).
# `put_extra` stores one and bumps the version, so workers and their snapshots pick it up.
CATEGORY_EXTRA_KINDS: tuple[str, ...] = EXTRA_KINDS

_WRITE_LUA = """
-- KEYS[1] categories hash, KEYS[2] deleted set, KEYS[3] version, KEYS[4..] the category's extras (delete);
-- ARGV[1] 'put'|'delete', ARGV[2] name, ARGV[3] json (put). Refused (-1) while no catalog is published: a
-- write must not create a catalog of one. A deleted category takes its extras with it, so a new category of
-- the same name never inherits the old one's references or threshold.
if redis.call('EXISTS', KEYS[3]) == 0 then return {-1, 0} end
local existed
if ARGV[1] == 'put' then
  existed = 1 - redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('SREM', KEYS[2], ARGV[2])
else
  existed = redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[2])
  for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
end
return {redis.call('INCR', KEYS[3]), existed}
"""

_RESTORE_LUA = """
-- KEYS[1] categories hash, KEYS[2] deleted set, KEYS[3] version, KEYS[4..] extras of the categories held now.
-- ARGV: the snapshot's version, n, n name/json pairs, m, m deleted names, k, k key/value pairs of extras.
-- Only while the published catalog is older than the snapshot (none published: 0); then it is replaced
-- whole (a worker that seeded the bundled categories into an emptied Redis must not mix with it) and the
-- version moves past both. Returns the new version, or 0 when the published catalog was not older.
local current = tonumber(redis.call('GET', KEYS[3]) or '0')
if current >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
for j = 4, #KEYS do redis.call('DEL', KEYS[j]) end
local i = 2
local n = tonumber(ARGV[i])
for j = 1, n do redis.call('HSET', KEYS[1], ARGV[i + 2 * j - 1], ARGV[i + 2 * j]) end
i = i + 2 * n + 1
local m = tonumber(ARGV[i])
for j = 1, m do redis.call('SADD', KEYS[2], ARGV[i + j]) end
i = i + m + 1
local k = tonumber(ARGV[i])
for j = 1, k do redis.call('SET', ARGV[i + 2 * j - 1], ARGV[i + 2 * j]) end
local version = tonumber(ARGV[1]) + 1
redis.call('SET', KEYS[3], version)
return version
"""


class CatalogNotPublishedError(RuntimeError):
    """A write to a store that holds no catalog (Redis restarted empty, and no worker re-published yet)."""


@dataclass
class CatalogSnapshot:
    """What a category store held at one version: what a worker re-publishes when Redis comes back empty.

    `extras` maps category name -> kind -> bytes for the kinds in CATEGORY_EXTRA_KINDS.
    """

    version: int
    categories: dict[str, Category]
    deleted: set[str] = field(default_factory=set)
    extras: dict[str, dict[str, bytes]] = field(default_factory=dict)


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
        self._write = redis.register_script(_WRITE_LUA)
        self._restore = redis.register_script(_RESTORE_LUA)

    @property
    def _catalog_keys(self) -> list[str]:
        return [self.keys.categories, self.keys.categories_deleted, self.keys.categories_version]

    async def version(self) -> int:
        """The catalog's version; 0: none is published (a fresh or emptied Redis)."""
        return int(await self.redis.get(self.keys.categories_version) or 0)

    async def all(self) -> dict[str, Category]:
        raw = await self.redis.hgetall(self.keys.categories)
        return {k.decode(): Category.model_validate_json(v) for k, v in raw.items()}

    async def _write_one(self, op: str, name: str, payload: str = "") -> tuple[int, bool]:
        extras = [self.keys.category_extra(name, k) for k in CATEGORY_EXTRA_KINDS] if op == "delete" else []
        version, existed = await self._write(keys=self._catalog_keys + extras, args=[op, name, payload])
        if int(version) < 0:
            raise CatalogNotPublishedError("no category catalog is published in Redis (it restarted empty?); "
                                           "a live `filo worker` re-publishes it within seconds")
        return int(version), bool(existed)

    async def put(self, category: Category) -> int:
        return (await self._write_one("put", category.name, category.model_dump_json()))[0]

    async def delete(self, name: str) -> bool:
        return (await self._write_one("delete", name))[1]

    async def put_extra(self, name: str, kind: str, data: bytes) -> int:
        """Store per-category data of a kind in CATEGORY_EXTRA_KINDS, and bump the version so workers
        (and their snapshots) pick it up."""
        if kind not in CATEGORY_EXTRA_KINDS:
            raise ValueError(f"unknown per-category data kind {kind!r}; known: {CATEGORY_EXTRA_KINDS}")
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.category_extra(name, kind), data)
        pipe.incr(self.keys.categories_version)
        return int((await pipe.execute())[-1])

    async def snapshot(self) -> CatalogSnapshot:
        """Everything the catalog consists of, read in one transaction (see `restore`)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.categories_version)
        pipe.hgetall(self.keys.categories)
        pipe.smembers(self.keys.categories_deleted)
        version, raw, deleted = await pipe.execute()
        categories = {k.decode(): Category.model_validate_json(v) for k, v in raw.items()}
        extras: dict[str, dict[str, bytes]] = {}
        if CATEGORY_EXTRA_KINDS and categories:
            pairs = [(n, k) for n in categories for k in CATEGORY_EXTRA_KINDS]
            values = await self.redis.mget([self.keys.category_extra(n, k) for n, k in pairs])
            for (n, k), v in zip(pairs, values, strict=True):
                if v is not None:
                    extras.setdefault(n, {})[k] = v
        return CatalogSnapshot(int(version or 0), categories, {d.decode() for d in deleted}, extras)

    async def restore(self, snap: CatalogSnapshot) -> int:
        """Publish `snap` if (and only if) the published catalog is older (or there is none): Redis came back
        empty, or a worker that started on an emptied Redis published the bundled categories alone as a new
        version 1. The new version, or 0 when the published one was not older."""
        held = [k.decode() for k in await self.redis.hkeys(self.keys.categories)]
        stale = [self.keys.category_extra(n, k) for n in held for k in CATEGORY_EXTRA_KINDS]
        args: list[Any] = [snap.version, len(snap.categories)]
        for name, category in sorted(snap.categories.items()):
            args += [name, category.model_dump_json()]
        args += [len(snap.deleted), *sorted(snap.deleted)]
        extras = [(self.keys.category_extra(n, k), v) for n, kinds in snap.extras.items() for k, v in kinds.items()]
        args.append(len(extras))
        for key, value in extras:
            args += [key, value]
        return int(await self._restore(keys=self._catalog_keys + stale, args=args))

    async def seed(self, categories: list[Category]) -> int:
        args: list[str] = []
        for c in categories:
            args += [c.name, c.model_dump_json()]
        return int(await self._seed(keys=self._catalog_keys, args=args))


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
            write_private(self.path, json.dumps(state, ensure_ascii=False, indent=1).encode("utf-8"),
                          prefix=".categories-")
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
        write_private(self._path(key), data, prefix=".cache-")


# --- the cache blob: the engine's {key: blob} prompt caches as one byte string, as a CacheStore keeps it ------


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


