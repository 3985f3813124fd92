"""Every Redis key of one deployment, and every cache key, in one place: the queue and the durable catalog
share one Redis, and the caches are keyed by one function (`cache_key`) over one hash (`short_digest`).

Names derive from the stream name, so deployments can share a Redis; they and the persisted cache keys are part
of the protocol between API pods and workers of different versions (a rolling deploy mixes them), so they
never change lightly (tests/test_references_service.py pins them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from descriptions import Category, category_fingerprint
from service.settings import FiloSettings


@dataclass
class Keys:
    """Every Redis key of one deployment, derived from the stream name so deployments can share a Redis."""

    stream: str
    group: str

    @classmethod
    def from_settings(cls, settings: FiloSettings) -> Keys:
        return cls(settings.stream, settings.consumer_group)

    def reply(self, request_id: str) -> str:
        return f"{self.stream}:reply:{request_id}"

    @property
    def workers(self) -> str:
        return f"{self.stream}:workers"

    @property
    def workers_applied(self) -> str:
        """Hash: worker name -> the categories version it has applied (caches built)."""
        return f"{self.stream}:workers:applied"

    @property
    def categories(self) -> str:
        return f"{self.stream}:categories"

    @property
    def categories_deleted(self) -> str:
        return f"{self.stream}:categories:deleted"

    @property
    def categories_version(self) -> str:
        return f"{self.stream}:categories:version"

    def cache(self, key: str) -> str:
        return f"{self.stream}:cache:{key}"

    def job(self, job_id: str) -> str:
        """A background job's state (JSON)."""
        return f"{self.stream}:job:{job_id}"

    def job_claim(self, category: str) -> str:
        """The id of the job a category runs now (one at a time)."""
        return f"{self.stream}:job:category:{category}"

    def category_lock(self, name: str) -> str:
        """The lock every change of a category's references or threshold holds (one change at a time)."""
        return f"{self.stream}:category:lock:{name}"

    def category_extra(self, name: str, kind: str) -> str:
        """Per-category data beyond the descriptions (see `CATEGORY_EXTRA_KINDS` in service/catalog/store.py)."""
        return f"{self.stream}:category:{kind}:{name}"


# --- cache keys and content ids: one hash, one key function -----------------------------------------------


def short_digest(data: bytes) -> str:
    """16 hex digits of the SHA-256 of `data`: the hash behind every cache key and content id of the service
    (reference image ids, a reference set's digest, `content_digest`)."""
    return hashlib.sha256(data).hexdigest()[:16]


def content_digest(value: Any) -> str:
    """`short_digest` of `value` as canonical JSON, so equal descriptions give equal keys in every process."""
    return short_digest(json.dumps(value, sort_keys=True, default=str).encode())


def cache_key(model_info: dict[str, Any], *scope: Any) -> str:
    """The one key of a cache built with a model: `{name}-{digest}` of the model's whole description and of
    `scope` (what else the cache depends on: the few-shot settings of the reference memories), so a cache is
    only ever used by the model, and with the settings, that built it.

    It names the persisted prompt cache (`Keys.cache(cache_key(info))` in Redis, a file in embedded mode) and
    each process's reference memories (`service.catalog.references.MemoryCache`). The persisted form (no
    `scope`) is shared by pods of different versions, so its bytes never change.
    """
    digest = content_digest([model_info, *scope] if scope else model_info)
    return f"{model_info.get('name', 'model')}-{digest}"


def prompt_bank_key(model_info: dict[str, Any], category: Category) -> str:
    """A category's entry in the persisted prompt cache (whose key is `cache_key(model_info)`): the backbone,
    its weights and the category's content (`descriptions.category_fingerprint`). Stored inside the cache
    that pods of different versions share, so its bytes never change."""
    return f"{model_info['backbone']}:{model_info['clip_weights']}:{category_fingerprint(category)}"
