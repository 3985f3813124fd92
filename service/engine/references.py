"""The engine's side of few-shot references: build patch memories with the engine's model, fuse them in.

`InspectionEngine` holds one `EngineReferences`. It keeps each category's `ReferenceSet` (the images,
what the catalog stores) and a `MemoryCache` of the memories built from them for this process's model
(service/catalog/references.py). A memory is built with exactly the inspection path's preprocessing and
encoder (`InspectionEngine.prepare`, one FiLo forward per batch of references), so reference and
inspected patches are comparable; the inspected image's own taps come from its single forward pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models import references as mr
from service.catalog.references import MemoryCache, ReferenceSet
from service.catalog.thresholds import ThresholdRecord, ThresholdRule, resolve
from service.core.imaging import decode_image
from service.core.keys import cache_key
from service.settings import FiloSettings

if TYPE_CHECKING:
    from descriptions import Category, CategoryCatalog
    from models.filo import FiLoOutput

# one chunk of reference images through the model, zero-shot (the engine's own preprocessing and precision)
Encode = Callable[[Sequence[np.ndarray], "Category"], "FiLoOutput"]

log = logging.getLogger(__name__)

MEMORY_DTYPE = torch.float16  # half the bytes of fp32; cosines of unit rows lose nothing that matters


class EngineReferences:
    """A process's few-shot state: each category's references, their patch memories (LRU) and thresholds.

    It knows the model only through `encode` (and the model's description `info`, which keys its memories),
    so the engine owns it without it owning the engine.
    """

    def __init__(self, info: dict[str, Any], catalog: CategoryCatalog, encode: Encode, image_size: int,
                 settings: FiloSettings | None = None):
        self.info = info
        self.catalog = catalog
        self.encode = encode
        self.image_size = image_size
        self.sets: dict[str, ReferenceSet] = {}
        self.thresholds: dict[str, ThresholdRecord] = {}  # per category, from the catalog
        # per category: (reference digest, leave-one-out scores) of the last memory built, kept apart from the
        # bounded memory cache so that the category's rule never needs an evicted memory rebuilt
        self._loo: dict[str, tuple[str, tuple[float, ...]]] = {}
        self._lock = threading.RLock()
        self.configure(settings if settings is not None else FiloSettings())  # defaults: the settings' alone

    def configure(self, settings: FiloSettings) -> None:
        """Take the few-shot settings; a new memory cache (keyed by them) starts empty. Called once, at start."""
        self.max_patches = settings.reference_max_patches
        self.match = settings.reference_match
        self.radius = settings.reference_radius
        self.weight = settings.reference_weight
        self.max_image_pixels = settings.max_image_pixels
        self.batch_size = settings.max_batch_size
        self.default_thresholds = dict(settings.thresholds)
        self.default_threshold = settings.default_threshold
        memory_settings = {"max_patches": self.max_patches, "match": self.match, "radius": self.radius,
                           "weight": self.weight}
        self.cache = MemoryCache(cache_key(self.info, memory_settings), int(settings.reference_memory_mb * 2**20))

    # --- the reference sets ------------------------------------------------------------------------
    def set(self, category: str, refs: ReferenceSet) -> mr.ReferenceMemory | None:
        """Install a category's references and build their memory now (a PUT answers once it is usable)."""
        memory = self.prebuild(category, refs)
        self.install(category, refs, memory)
        return memory

    def prebuild(self, category: str, refs: ReferenceSet) -> mr.ReferenceMemory | None:
        """The memory of `refs`, built without touching what inspections use: safe on a thread of its own while
        batches run (the slow part of a reference change), then `install`ed between batches. None: no refs."""
        if not len(refs):
            return None
        found = self.cache.get(category, refs.digest)
        if found is not None:
            return found
        images = [decode_image(im.data, self.max_image_pixels) for im in refs.images]
        return self.build(images, self.catalog.get(category))

    def install(self, category: str, refs: ReferenceSet, memory: mr.ReferenceMemory | None) -> None:
        """Make `refs` (with the memory `prebuild` made of them) the category's: a few dictionary writes."""
        with self._lock:
            if not len(refs) or memory is None:
                self.clear(category)
                return
            self.sets[category] = refs
            self.cache.put(category, refs.digest, memory, memory.nbytes)
            self._loo[category] = (refs.digest, tuple(memory.loo_scores))

    def clear(self, category: str) -> None:
        with self._lock:
            self.sets.pop(category, None)
            self._loo.pop(category, None)
            self.cache.drop(category)

    def count(self, category: str) -> int:
        refs = self.sets.get(category)
        return len(refs) if refs else 0

    def memory_bytes(self, category: str) -> int:
        return self.cache.nbytes(category)

    def memory(self, category: str) -> mr.ReferenceMemory | None:
        """The category's memory for this model, built (again) from its images when missing or evicted."""
        refs = self.sets.get(category)
        if not refs:
            return None
        with self._lock:
            found = self.cache.get(category, refs.digest)
            if found is not None:
                return found
            memory = self.prebuild(category, refs)
            assert memory is not None
            self.cache.put(category, refs.digest, memory, memory.nbytes)
            self._loo[category] = (refs.digest, tuple(memory.loo_scores))
            log.info("category %s: reference memory of %d image(s) built, %d bytes", category, len(refs),
                     memory.nbytes)
            return memory

    # --- building --------------------------------------------------------------------------------
    def build(self, images: Sequence[np.ndarray], category: Category) -> mr.ReferenceMemory:
        """A memory from decoded HxWx3 uint8 images, with leave-one-out scores of the references."""
        tokens, zs_maps, text = [], [], []
        for s in range(0, len(images), self.batch_size):
            out = self.encode(images[s:s + self.batch_size], category)
            tokens.append(mr.patch_tokens(out.stream))
            zs_maps.append(out.anomaly_map.float())
            text.append(out.text_probs[:, 1].float())
        per_tap = [torch.cat([t[i] for t in tokens]) for i in range(len(tokens[0]))]
        with torch.no_grad():
            loo = mr.leave_one_out_distances(per_tap, self.match, self.radius) if len(images) > 1 else None
            memory = mr.build_memory(per_tap, self.max_patches, MEMORY_DTYPE, self.match,
                                     self.radius, self.weight, loo_distances=loo)
            if loo is not None:
                memory.loo_scores = tuple(float(v) for v in mr.leave_one_out_scores(
                    loo, torch.cat(zs_maps), torch.cat(text), memory, self.image_size))
        return memory

    # --- thresholds --------------------------------------------------------------------------------
    def set_threshold(self, category: str, record: ThresholdRecord | None) -> None:
        if record is None:
            self.thresholds.pop(category, None)
        else:
            self.thresholds[category] = record

    def rule(self, category: str, memory: mr.ReferenceMemory | None) -> ThresholdRule:
        """The decision rule of an inspection of `category` with `memory` (None: zero-shot)."""
        refs = self.sets.get(category)
        digest = refs.digest if refs and memory is not None else ""
        loo = memory.loo_scores if memory is not None else ()
        default = self.default_thresholds.get(category, self.default_threshold)
        return resolve(self.thresholds.get(category), digest, loo, default, self.info.get("version"))

    def category_rule(self, category: str) -> ThresholdRule:
        """The rule an inspection of `category` gets now, with its own references: what the catalog shows."""
        refs = self.sets.get(category)
        default = self.default_thresholds.get(category, self.default_threshold)
        if not refs:
            return resolve(self.thresholds.get(category), "", (), default, self.info.get("version"))
        known = self._loo.get(category)
        if known is None or known[0] != refs.digest:
            memory = self.memory(category)  # not built yet with this model: build it, as an inspection would
            known = (refs.digest, tuple(memory.loo_scores) if memory is not None else ())
        return resolve(self.thresholds.get(category), known[0], known[1], default, self.info.get("version"))

    def rules(self) -> dict[str, ThresholdRule]:
        """Every registered category's rule (queue mode publishes them for the API pods)."""
        return {name: self.category_rule(name) for name in self.catalog.names()}

    # --- inspection --------------------------------------------------------------------------------
    def memories_for(self, requests: Sequence[Any], categories: Sequence[Category]) -> list[mr.ReferenceMemory | None]:
        """Per request: its explicit memory (`InspectRequest.references`), else its category's, else None."""
        out = []
        for req, cat in zip(requests, categories, strict=True):
            explicit = getattr(req, "references", None)
            out.append(explicit if explicit is not None else self.memory(cat.name))
        return out

    def fuse(self, maps: torch.Tensor, stream: Sequence[torch.Tensor],
             memories: Sequence[mr.ReferenceMemory | None]) -> torch.Tensor:
        """maps (B, S, S) zero-shot; images with a memory get the fused map, the others keep theirs exactly."""
        groups: dict[int, list[int]] = {}
        for i, mem in enumerate(memories):
            if mem is not None:
                groups.setdefault(id(mem), []).append(i)
        if not groups:
            return maps
        maps = maps.clone()
        size = maps.shape[-1]
        for idx in groups.values():
            mem = memories[idx[0]]
            sel = torch.tensor(idx, device=maps.device)
            tokens = mr.patch_tokens([t[sel] for t in stream])
            few = mr.few_shot_map(tokens, mem.to(maps.device), size)
            maps[sel] = mr.fuse_maps(maps[sel], few, mem.weight)
        return maps
