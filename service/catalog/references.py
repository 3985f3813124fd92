"""Normal reference images of a category and the patch memories built from them.

Two layers, kept apart on purpose:

- `ReferenceImage` / `ReferenceSet`: what a user registered (the encoded image bytes, as sent, with an
  id, the size and a content digest). This is the durable part: it lives with the category in the
  catalog (Redis in queue mode, `state_dir` in embedded mode; see service/catalog/store.py), so
  every worker, restart and new pod has it. It is serialised as one JSON document per category.
- `MemoryCache`: the device-side patch memories (models/references.py) each process builds from
  those images with its own model. Keyed by `service.core.keys.cache_key` of the model's description
  and the memory settings, and per category by the reference set's digest, so a memory built by
  another model, with other settings or from other images is never used; bounded in total bytes,
  least recently used first out (an evicted memory is rebuilt from the images on its next use).
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.catalog.thresholds import ThresholdRule
from service.core.keys import short_digest

REFERENCES_FORMAT = "filo-references/v1"


@dataclass(frozen=True)
class ReferenceImage:
    """One registered normal image: `data` is the file as uploaded (already decoded once to validate it)."""

    id: str
    data: bytes
    width: int
    height: int

    @classmethod
    def from_bytes(cls, data: bytes, width: int, height: int) -> ReferenceImage:
        return cls(image_id(data), data, width, height)

    def item(self) -> dict[str, Any]:
        """The JSON the references routes list: id, size and stored bytes."""
        return {"id": self.id, "width": self.width, "height": self.height, "bytes": len(self.data)}


def image_id(data: bytes) -> str:
    """A content id: the same file registered twice is one reference."""
    return short_digest(data)


@dataclass(frozen=True)
class ReferenceSet:
    """A category's references, in registration order (duplicates by content are kept once)."""

    images: tuple[ReferenceImage, ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def digest(self) -> str:
        """Names this exact set: a memory built from another set is another cache entry."""
        return short_digest(",".join(im.id for im in self.images).encode())

    def ids(self) -> list[str]:
        return [im.id for im in self.images]

    def added(self, new: Iterable[ReferenceImage]) -> ReferenceSet:
        seen = set(self.ids())
        out = list(self.images)
        for im in new:
            if im.id not in seen:
                out.append(im)
                seen.add(im.id)
        return ReferenceSet(tuple(out))

    def without(self, image_id_: str) -> ReferenceSet:
        return ReferenceSet(tuple(im for im in self.images if im.id != image_id_))

    def to_json(self) -> bytes:
        return json.dumps({"format": REFERENCES_FORMAT, "images": [
            {"id": im.id, "width": im.width, "height": im.height, "data": base64.b64encode(im.data).decode()}
            for im in self.images]}).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> ReferenceSet:
        doc = json.loads(raw)
        if doc.get("format") != REFERENCES_FORMAT:
            raise ValueError(f"not a {REFERENCES_FORMAT} document")
        return cls(tuple(ReferenceImage(d["id"], base64.b64decode(d["data"]), int(d["width"]), int(d["height"]))
                         for d in doc["images"]))


@dataclass
class _Entry:
    digest: str
    memory: Any  # models.references.ReferenceMemory (kept untyped: this module must import without torch)
    nbytes: int


@dataclass
class MemoryCache:
    """Built memories per category, for one model version; at most `budget_bytes` in all (LRU out).

    A memory larger than the whole budget is still kept (alone): refusing it would make its
    category unusable, and the per-category coreset budget already bounds it.
    """

    model_key: str  # service.core.keys.cache_key(model_info, memory settings)
    budget_bytes: int
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    evictions: int = 0

    def get(self, category: str, digest: str) -> Any | None:
        entry = self._entries.get(category)
        if entry is None or entry.digest != digest:
            return None
        self._entries.move_to_end(category)
        return entry.memory

    def put(self, category: str, digest: str, memory: Any, nbytes: int) -> None:
        self._entries[category] = _Entry(digest, memory, nbytes)
        self._entries.move_to_end(category)
        while len(self._entries) > 1 and self.total_bytes > self.budget_bytes:
            self._entries.popitem(last=False)
            self.evictions += 1

    def drop(self, category: str) -> None:
        self._entries.pop(category, None)

    def nbytes(self, category: str) -> int:
        entry = self._entries.get(category)
        return entry.nbytes if entry else 0

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def categories(self) -> list[str]:
        return list(self._entries)


def reference_paths(paths: Iterable[str]) -> list[str]:
    """Image files, and the image files of folders (`service.core.imaging.list_images`: name order, not recursive),
    in the order given."""
    from pathlib import Path

    from service.core.imaging import list_images

    out: list[str] = []
    for p in paths:
        path = Path(p)
        out += [str(f) for f in list_images(path)] if path.is_dir() else [str(path)]
    return out


def read_reference_files(paths: Iterable[str], max_pixels: int) -> ReferenceSet:
    """A ReferenceSet from files and folders; raises OSError or service.core.imaging.ImageDecodeError."""
    from service.core.imaging import decode_image

    images = []
    for path in reference_paths(paths):
        with open(path, "rb") as f:
            data = f.read()
        arr = decode_image(data, max_pixels)
        images.append(ReferenceImage.from_bytes(data, arr.shape[1], arr.shape[0]))
    return ReferenceSet().added(images)


# --- where references and thresholds live: beside the category in the durable catalog -----------------

REFERENCES_KIND = "references"
THRESHOLD_KIND = "threshold"
EXTRA_KINDS = (REFERENCES_KIND, THRESHOLD_KIND)  # the catalog's per-category extras (CATEGORY_EXTRA_KINDS)
MEMORY_BYTES_KIND = "memory_bytes"  # written by each worker after building (not part of the catalog)
RULE_KIND = "rule"  # the category's decision rule as the workers resolved it (not part of the catalog)


class RedisExtras:
    """Queue mode: the catalog's per-category extras in Redis; a write bumps the catalog version, so every
    worker applies it before its next batch, and it is in every worker's snapshot (re-published after a
    FLUSHALL with the rest of the catalog)."""

    def __init__(self, store: Any) -> None:
        self.store = store  # service.catalog.store.RedisCategoryStore

    async def get(self, name: str, kind: str) -> bytes | None:
        return await self.store.redis.get(self.store.keys.category_extra(name, kind))

    async def put(self, name: str, kind: str, data: bytes) -> None:
        await self.store.put_extra(name, kind, data)

    async def memory_bytes(self, name: str) -> int:
        raw = await self.get(name, MEMORY_BYTES_KIND)
        return int(raw or 0)

    async def rule(self, name: str) -> ThresholdRule | None:
        """The rule the workers resolved when they last applied the catalog (None: no worker has yet)."""
        raw = await self.get(name, RULE_KIND)
        return ThresholdRule.from_dict(json.loads(raw)) if raw else None


class FileExtras:
    """Embedded mode: one file per category and kind under `state_dir/category-extras` (written atomically)."""

    def __init__(self, directory: Any) -> None:
        from pathlib import Path

        self.directory = Path(directory)

    def _path(self, name: str, kind: str) -> Any:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        return self.directory / f"{safe}.{kind}.json"

    async def get(self, name: str, kind: str) -> bytes | None:
        try:
            return self._path(name, kind).read_bytes()
        except FileNotFoundError:
            return None

    async def put(self, name: str, kind: str, data: bytes) -> None:
        import os
        import tempfile

        path = self._path(name, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".extra-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    async def delete(self, name: str) -> None:
        """Drop every extra of a category (it was deleted: a new one of that name starts without them)."""
        for kind in EXTRA_KINDS:
            self._path(name, kind).unlink(missing_ok=True)

    async def all(self, names: Iterable[str]) -> dict[str, dict[str, bytes]]:
        out: dict[str, dict[str, bytes]] = {}
        for name in names:
            for kind in EXTRA_KINDS:
                data = await self.get(name, kind)
                if data is not None:
                    out.setdefault(name, {})[kind] = data
        return out


@dataclass
class ExtrasPlan:
    """What `plan_extras` prepared off the engine thread for `install_extras` to swap in between batches."""

    references: dict[str, tuple[ReferenceSet, Any]] = field(default_factory=dict)  # changed sets and their memory
    thresholds: dict[str, Any] = field(default_factory=dict)  # every category's ThresholdRecord (or None)


def plan_extras(engine: Any, extras: dict[str, dict[str, bytes]]) -> ExtrasPlan:
    """The slow half of applying the catalog's extras, safe on a thread of its own while batches run: the
    memories of the reference sets that changed are built here (with this process's model, so a new checkpoint
    never serves an old memory). A set that fails to build is logged and planned as none (the category then
    inspects zero-shot) instead of stopping the worker."""
    import logging

    from service.catalog.thresholds import ThresholdRecord

    log = logging.getLogger(__name__)
    refs = engine.references
    plan = ExtrasPlan()
    for name in engine.catalog.names():
        kinds = extras.get(name, {})
        raw = kinds.get(REFERENCES_KIND)
        wanted = ReferenceSet.from_json(raw) if raw else ReferenceSet()
        current = refs.sets.get(name)
        if (current.digest if current else ReferenceSet().digest) != wanted.digest:
            try:
                plan.references[name] = (wanted, refs.prebuild(name, wanted))
            except Exception:
                log.exception("category %s: its %d reference image(s) could not be built", name, len(wanted))
                plan.references[name] = (ReferenceSet(), None)
        raw_t = kinds.get(THRESHOLD_KIND)
        plan.thresholds[name] = ThresholdRecord.from_json(raw_t) if raw_t else None
    return plan


def install_extras(engine: Any, plan: ExtrasPlan) -> dict[str, int]:
    """The quick half, on the engine's thread between batches: the planned references and thresholds become
    the engine's. Returns the memory bytes per category holding references."""
    refs = engine.references
    for name, (wanted, memory) in plan.references.items():
        if name in engine.catalog:
            refs.install(name, wanted, memory)
    for name, record in plan.thresholds.items():
        refs.set_threshold(name, record)
    for name in list(refs.sets):
        if name not in engine.catalog:
            refs.clear(name)
    return {name: refs.memory_bytes(name) for name in engine.catalog.names() if refs.count(name)}


def apply_extras(engine: Any, extras: dict[str, dict[str, bytes]]) -> dict[str, int]:
    """Make the engine's references and thresholds equal the catalog's, both halves on the calling thread (start-up,
    where no batch runs yet). Returns the memory bytes per category holding references."""
    return install_extras(engine, plan_extras(engine, extras))


async def publish_applied(redis: Any, keys: Any, sizes: dict[str, int], rules: dict[str, ThresholdRule]) -> None:
    """Queue mode, after a worker applied the catalog: what each category's memory takes on its device (for
    `GET .../references`) and each category's decision rule as the engine resolved it (for `GET
    /v1/categories/{name}` and the threshold history), written before the worker reports the version applied,
    so an API pod that waited for the workers reads the rule its next inspection gets."""
    values = {keys.category_extra(name, MEMORY_BYTES_KIND): str(n) for name, n in sizes.items()}
    values.update({keys.category_extra(name, RULE_KIND): json.dumps(rule.to_dict()) for name, rule in rules.items()})
    if values:
        await redis.mset(values)
