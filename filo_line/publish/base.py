"""The one interface every publisher implements, and the bounded queue with its own thread they share.

`publish` only appends to a bounded queue and returns: a publisher whose target is slow or away can fill its
queue, never the station's time. When the queue is full the oldest report is dropped and counted (the newest
says most about the line now).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from filo_line.report import PartReport

log = logging.getLogger("filo.line.publish")

Item = tuple[PartReport, "bytes | None"]


class Publisher(Protocol):
    kind: str
    target: str  # the broker URL and topic, or the folder: for logs, metrics and --check

    @property
    def connected(self) -> bool | None:
        """Whether the target is reachable now; None where there is nothing to connect to."""
        ...

    @property
    def dropped(self) -> int: ...

    def start(self) -> None: ...

    def publish(self, report: PartReport, image: bytes | None) -> None:
        """Queue one report (and its image); returns at once."""
        ...

    def stop(self, flush_s: float = 2.0) -> None:
        """Deliver what is queued within `flush_s`, then stop."""
        ...

    def check(self, timeout_s: float = 5.0) -> str:
        """One line for --check (blocking; raises OSError or RuntimeError with the reason)."""
        ...


class QueuedDelivery:
    """A bounded queue drained by one daemon thread calling `deliver(item)`; `deliver` returns False to keep the
    item and be called again after `retry_s` (the target is away)."""

    def __init__(self, name: str, deliver: Callable[[Item], bool], capacity: int = 10_000, retry_s: float = 0.2,
                 on_drop: Callable[[], None] | None = None) -> None:
        self._deliver = deliver
        self._queue: deque[Item] = deque()
        self._capacity = capacity
        self._retry_s = retry_s
        self._on_drop = on_drop
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"publish-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: Item) -> None:
        with self._cond:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()
                self.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()
            self._queue.append(item)
            self._cond.notify()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue[0]
                self._busy = True
            try:
                delivered = self._deliver(item)
            except Exception:  # a report that cannot be delivered at all is dropped, not retried forever
                log.exception("publishing the report of part %s failed; dropped", item[0].part_id)
                delivered = True
                self.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()
            with self._cond:
                self._busy = False
                if delivered and self._queue and self._queue[0] is item:
                    self._queue.popleft()
                stopping = self._stopping
            if not delivered:
                if stopping:
                    return
                time.sleep(self._retry_s)

    def stop(self, flush_s: float) -> None:
        """Let the thread deliver for up to `flush_s`, then leave what is left."""
        end = time.monotonic() + flush_s
        while self.pending and time.monotonic() < end:
            time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.1, end - time.monotonic()) + 1.0)
