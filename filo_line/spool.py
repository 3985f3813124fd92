"""The bounded on-disk spool: images the service did not inspect in time, or at all, wait here for it.

An entry is two files under `<dir>/entries/`: the image (`<key>.img`) and its meta (`<key>.json`: station,
category, part id, request id, when it was triggered and what the PLC was told). Each is written to `tmp/`,
fsynced and renamed into place, the meta last, and the directory fsynced: an entry whose meta exists is whole,
so a `kill -9` at any moment leaves either a whole entry or none (the caller moves the source's file out of the
way only after `put` returned). An image without its meta is a put that never finished; opening the spool
removes it. Keys sort by the time they were spooled, so the replayer sends the oldest first.

The bound is on the bytes of all entries (`max_mb`, MiB). When a new image does not fit it is refused
(`SpoolFull`): what is already waiting keeps its place, the refusal is counted (`drops["full"]`), and the
station files the image where the operator finds it (a folder source's `failed/`, with the reason beside it).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


class SpoolFull(RuntimeError):
    """The image does not fit under the spool's bound."""


@dataclass(frozen=True)
class SpoolMeta:
    station: str
    category: str
    part_id: str
    request_id: str
    image_name: str
    triggered_at: float
    signalled_at: float | None  # None: the PLC was never told (no PLC, or the signal was missed)
    signalled: dict[str, bool] | None  # {"ok", "ng", "error"} as written to the PLC
    signalled_verdict: str  # what was published at the time: timeout, error, ok, ng
    reason: str  # why the image is here

    @classmethod
    def from_json(cls, text: str) -> SpoolMeta:
        data = json.loads(text)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SpoolEntry:
    key: str
    meta: SpoolMeta
    image: bytes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(tmp: Path, final: Path, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


class Spool:
    """Thread-safe: the stations put from worker threads, the replayer reads and removes."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int,
                 on_change: Callable[[int, int], None] | None = None,
                 on_drop: Callable[[str], None] | None = None) -> None:
        self.dir = Path(directory)
        self.entries_dir = self.dir / "entries"
        self.tmp_dir = self.dir / "tmp"
        self.max_bytes = max_bytes
        self.drops: Counter[str] = Counter()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._on_change = on_change
        self._on_drop = on_drop

    # --- state ---

    @property
    def depth(self) -> int:
        return len(self._sizes)

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.depth, self.size_bytes)

    def count_drop(self, reason: str) -> None:
        with self._lock:
            self.drops[reason] += 1
        if self._on_drop is not None:
            self._on_drop(reason)

    # --- lifecycle ---

    def open(self) -> None:
        """Create the folders, finish what a crash left (half-written temp files, an image without its meta),
        and count what is waiting."""
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        sizes: dict[str, int] = {}
        for meta in self.entries_dir.glob("*.json"):
            image = meta.with_suffix(".img")
            if image.exists():
                sizes[meta.stem] = meta.stat().st_size + image.stat().st_size
            else:
                meta.unlink(missing_ok=True)
        for image in self.entries_dir.glob("*.img"):
            if image.stem not in sizes:
                image.unlink(missing_ok=True)
        with self._lock:
            self._sizes = sizes
        self._changed()

    def check(self) -> str:
        """One line for --check: the folder is writable and what waits in it."""
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        probe = self.tmp_dir / f"check-{os.getpid()}"
        _write_durably(probe.with_suffix(".tmp"), probe, b"ok")
        probe.unlink()
        waiting = len(list(self.entries_dir.glob("*.json")))
        used = sum(p.stat().st_size for p in self.entries_dir.iterdir())
        return (f"{self.dir}: writable, {waiting} images waiting "
                f"({used / MIB:.1f} of {self.max_bytes / MIB:.0f} MiB)")

    # --- entries ---

    def put(self, meta: SpoolMeta, image: bytes) -> str:
        """Keep one image durably; returns its key once it is on disk. Raises SpoolFull (counted) when it does
        not fit, OSError when the disk refuses (counted as `io`)."""
        body = json.dumps(asdict(meta), sort_keys=True).encode()
        size = len(body) + len(image)
        with self._lock:
            if self.size_bytes + size > self.max_bytes:
                full = True
            else:
                full = False
                self._seq += 1
                key = f"{time.time_ns():020d}-{self._seq:06d}-{meta.request_id}"
                self._sizes[key] = size  # reserved while it is written
        if full:
            self.count_drop("full")
            raise SpoolFull(f"the spool holds {self.size_bytes / MIB:.1f} of {self.max_bytes / MIB:.1f} MiB; "
                            f"this image ({size / MIB:.2f} MiB) does not fit")
        try:
            _write_durably(self.tmp_dir / f"{key}.img", self.entries_dir / f"{key}.img", image)
            _write_durably(self.tmp_dir / f"{key}.json", self.entries_dir / f"{key}.json", body)
            _fsync_dir(self.entries_dir)
        except OSError:
            with self._lock:
                self._sizes.pop(key, None)
            for suffix in (".img", ".json"):
                (self.entries_dir / f"{key}{suffix}").unlink(missing_ok=True)
            self.count_drop("io")
            raise
        self._changed()
        return key

    def keys(self) -> list[str]:
        """The waiting entries' keys, oldest first."""
        with self._lock:
            return sorted(self._sizes)

    def read(self, key: str) -> SpoolEntry | None:
        """An entry, or None when it is gone or unreadable (an unreadable one is dropped and counted)."""
        try:
            meta = SpoolMeta.from_json((self.entries_dir / f"{key}.json").read_text())
            image = (self.entries_dir / f"{key}.img").read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            self.remove(key)
            self.count_drop("unreadable")
            return None
        return SpoolEntry(key, meta, image)

    def remove(self, key: str) -> None:
        (self.entries_dir / f"{key}.json").unlink(missing_ok=True)  # the meta first: the entry is gone
        (self.entries_dir / f"{key}.img").unlink(missing_ok=True)
        with self._lock:
            self._sizes.pop(key, None)
        self._changed()

    def describe(self) -> dict[str, Any]:
        return {"depth": self.depth, "bytes": self.size_bytes, "max_bytes": self.max_bytes, "drops": dict(self.drops)}
