"""The spool's replayer: sends each waiting image to the service once it answers again, oldest first.

An entry is sent with the request id its part was given at the line, so the service keeps one record of it even
when the first try reached the service after all (an answer the line had stopped waiting for). Its verdict is
published late (`late: true`) through the station it came from, and the PLC is never told: the part is past the
gate. An entry the service refuses (a 4xx: the image or the request is wrong) is published as a late error and
dropped (`drops["refused"]`); while the service is away the replayer backs off (0.5 s, doubling to 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from filo_line.client import Failure, Outcome, ServiceClient
from filo_line.spool import Spool, SpoolMeta

log = logging.getLogger("filo.line.replay")

LateSink = Callable[[SpoolMeta, Outcome, bytes], None]


class Replayer:
    def __init__(self, spool: Spool, client: ServiceClient, late: LateSink,
                 on_failure: Callable[[SpoolMeta, Failure], None] | None = None, idle_s: float = 0.5,
                 max_backoff_s: float = 10.0, timeout_s: float = 60.0) -> None:
        self.spool = spool
        self.client = client
        self.late = late
        self.on_failure = on_failure
        self.idle_s = idle_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.sent = 0

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = self.idle_s
        while not stop.is_set():
            keys = self.spool.keys()
            if not keys:
                await self._pause(stop, self.idle_s)
                continue
            if await self._drain(keys, stop):
                backoff = self.idle_s
            else:
                await self._pause(stop, backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _drain(self, keys: list[str], stop: asyncio.Event) -> bool:
        """Send the entries in order until the service fails; False when it failed at once (back off)."""
        for key in keys:
            if stop.is_set():
                return True
            entry = await asyncio.to_thread(self.spool.read, key)
            if entry is None:
                continue
            meta = entry.meta
            outcome = await self.client.inspect(
                entry.image, meta.image_name, category=meta.category, part_id=meta.part_id,
                request_id=meta.request_id, source=meta.station, timeout_s=self.timeout_s)
            if isinstance(outcome, Failure):
                if self.on_failure is not None:
                    self.on_failure(meta, outcome)
                if outcome.transient:
                    log.info("spool: the service is still away (%s); %d waiting", outcome.describe(),
                             self.spool.depth)
                    return False
                log.warning("spool: part %s refused by the service (%s); dropped", meta.part_id, outcome.describe())
                self.spool.count_drop("refused")
            self.late(meta, outcome, entry.image)
            await asyncio.to_thread(self.spool.remove, key)
            self.sent += 1
        return True
