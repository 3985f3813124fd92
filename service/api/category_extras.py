"""A category's stored extras as the routes read them (references, threshold), through the backend interface."""

from __future__ import annotations

import time
from typing import Any

from service.backends.base import Backend
from service.catalog.references import REFERENCES_KIND, THRESHOLD_KIND, ReferenceSet
from service.catalog.thresholds import ThresholdRecord


async def load_refs(backend: Backend, name: str) -> ReferenceSet:
    raw = await backend.get_extra(name, REFERENCES_KIND)
    return ReferenceSet.from_json(raw) if raw else ReferenceSet()


async def load_threshold(backend: Backend, name: str) -> ThresholdRecord | None:
    raw = await backend.get_extra(name, THRESHOLD_KIND)
    return ThresholdRecord.from_json(raw) if raw else None


async def category_threshold(backend: Backend, settings: Any, name: str) -> dict[str, Any]:
    """GET /v1/categories/{name}'s extra fields: threshold, threshold_source, references."""
    refs = await load_refs(backend, name)
    record = await load_threshold(backend, name)
    default = settings.thresholds.get(name, settings.default_threshold)
    digest = refs.digest if len(refs) else ""
    if record is not None and record.source == "manual" and record.threshold is not None:
        return {"threshold": record.threshold, "threshold_source": "manual", "references": len(refs)}
    if record is not None and record.threshold is not None and record.references_digest == digest:
        return {"threshold": record.threshold, "threshold_source": record.source, "references": len(refs)}
    return {"threshold": default, "threshold_source": "default", "references": len(refs)}


class ReviewMargins:
    """Each category's review margin as the inspect route needs it: read from the catalog at most every
    `ttl_s` per category (a change made through this process is seen at once, others' within `ttl_s`)."""

    def __init__(self, ttl_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[float, float]] = {}

    async def get(self, backend: Backend, name: str) -> float:
        hit = self._seen.get(name)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        record = await load_threshold(backend, name)
        margin = record.review_margin if record is not None else 0.0
        self._seen[name] = (time.monotonic(), margin)
        return margin

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)
