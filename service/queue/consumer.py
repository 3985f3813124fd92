"""The worker side of the queue: read batches, reclaim, reply-and-acknowledge, heartbeat.

The wire format and the design are in service/queue/protocol.py.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.core.keys import Keys
from service.queue.protocol import Entry, Reply, ensure_group, server_time_ms
from service.settings import FiloSettings


class Consumer:
    """What a worker does with the stream: read batches, reclaim, reply-and-acknowledge, heartbeat."""

    def __init__(self, redis: Redis, settings: FiloSettings, name: str) -> None:
        self.redis = redis
        self.keys = Keys.from_settings(settings)
        self.name = name
        self.claim_idle_ms = settings.claim_idle_ms
        self.reply_ttl_s = int(settings.request_timeout_s) + 60

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer: at most `count`, blocking up to `block_ms` for the first."""
        try:
            resp = await self.redis.xreadgroup(
                self.keys.group, self.name, {self.keys.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            await ensure_group(self.redis, self.keys)  # the stream was deleted (FLUSHALL): start again
            return []
        entries: list[Entry] = []
        for _stream, items in resp or []:
            for entry_id, fields in items:
                if fields:  # an entry deleted after delivery comes back empty
                    entries.append(Entry.parse(entry_id, fields))
        return entries

    async def read_batch(self, max_n: int, max_wait_ms: int, idle_block_ms: int) -> list[Entry]:
        """Up to `max_n` entries: block up to `idle_block_ms` for the first, then gather for `max_wait_ms`."""
        batch = await self.read(max_n, idle_block_ms)
        if not batch or len(batch) >= max_n or max_wait_ms <= 0:
            return batch
        until = time.monotonic() + max_wait_ms / 1000.0
        while len(batch) < max_n:
            left_ms = int((until - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = await self.read(max_n - len(batch), left_ms)
            if not more:
                break
            batch += more
        return batch

    async def claim(self, count: int) -> list[Entry]:
        """Take over entries other consumers left pending longer than `claim_idle_ms`."""
        try:
            resp = await self.redis.xautoclaim(
                self.keys.stream, self.keys.group, self.name, self.claim_idle_ms, start_id="0-0", count=count
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return []
        claimed = [Entry.parse(eid, fields) for eid, fields in resp[1] if fields]
        if not claimed:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for e in claimed:
            pipe.xpending_range(self.keys.stream, self.keys.group, min=e.entry_id, max=e.entry_id, count=1)
        for e, info in zip(claimed, await pipe.execute()):
            e.deliveries = int(info[0]["times_delivered"]) if info else 1
        return claimed

    async def touch(self, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this consumer is still working on, so nobody reclaims them."""
        if entry_ids:
            await self.redis.xclaim(self.keys.stream, self.keys.group, self.name, 0, entry_ids, justid=True)

    async def answer(self, entry: Entry, reply: Reply | bytes) -> None:
        """Reply, set the reply's expiry, acknowledge and delete the entry: all or nothing.

        Errors of single commands do not abort the others: after a FLUSHALL the group is gone, so XACK
        fails, but the caller still gets its reply."""
        pipe = self.redis.pipeline(transaction=True)
        if entry.reply_key:
            pipe.lpush(entry.reply_key, reply if isinstance(reply, bytes) else reply.encode())
            pipe.expire(entry.reply_key, self.reply_ttl_s)
        pipe.xack(self.keys.stream, self.keys.group, entry.entry_id)
        pipe.xdel(self.keys.stream, entry.entry_id)
        await pipe.execute(raise_on_error=False)

    async def report_applied(self, version: int) -> None:
        """Tell API processes this worker's caches are built for categories `version`."""
        await self.redis.hset(self.keys.workers_applied, self.name, version)

    async def heartbeat(self) -> int:
        now = await server_time_ms(self.redis)
        await self.redis.zadd(self.keys.workers, {self.name: now})
        return now

    async def leave(self) -> None:
        """On a clean exit: drop the heartbeat, and the consumer if it holds nothing pending."""
        await self.redis.zrem(self.keys.workers, self.name)
        await self.redis.hdel(self.keys.workers_applied, self.name)
        try:
            info = await self.redis.xinfo_consumers(self.keys.stream, self.keys.group)
        except ResponseError:
            return
        for c in info:
            if c["name"] in (self.name, self.name.encode()) and int(c["pending"]) == 0:
                await self.redis.xgroup_delconsumer(self.keys.stream, self.keys.group, self.name)
