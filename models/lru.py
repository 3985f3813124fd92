"""A mapping that keeps its ``maxsize`` most recently used entries: the one bound for the caches of models/.

Prompt banks per category, tokenised captions, Grounding DINO text passes and decoded phrases are all kept
this way: reading an entry (``get``) or writing it makes it the most recent, and a write past ``maxsize``
drops the least recently used one. Reads and writes hold a lock: an engine builds reference memories on a
thread of its own while its batches run (the prompt banks are shared), and a read racing an eviction must not
fail.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUDict(OrderedDict[K, V]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        super().__init__()
        self.maxsize = maxsize
        self._lock = threading.RLock()

    def get(self, key, default=None):
        with self._lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
            return default

    def __setitem__(self, key, value) -> None:
        with self._lock:
            super().__setitem__(key, value)
            self.move_to_end(key)
            if len(self) > self.maxsize:
                self.popitem(last=False)
