"""A category's stored extras as the routes read them (references, threshold), through the backend interface."""

from __future__ import annotations

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
    if record is not None and record.threshold is not None and record.references_digest == digest:
        return {"threshold": record.threshold, "threshold_source": record.source, "references": len(refs)}
    return {"threshold": default, "threshold_source": "default", "references": len(refs)}
