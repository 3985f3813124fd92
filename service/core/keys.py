"""Every Redis key of one deployment, in one place: the queue and the durable catalog share one Redis.

Names derive from the stream name, so deployments can share a Redis; they are part of the protocol between
API pods and workers of different versions (a rolling deploy mixes them), so they never change lightly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

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

    def category_extra(self, name: str, kind: str) -> str:
        """Per-category data beyond the descriptions (see `CATEGORY_EXTRA_KINDS` in service/catalog/store.py)."""
        return f"{self.stream}:category:{kind}:{name}"


def content_digest(value: Any) -> str:
    """The one content hash behind every cache key (prompt caches, reference memories): 16 hex digits of the
    SHA-256 of `value` as canonical JSON, so equal descriptions give equal keys in every process."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
