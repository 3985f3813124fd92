"""The worker side of the queue: read batches, reclaim, reply-and-acknowledge, heartbeat.

The wire format and the design are in service/queue/protocol.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.core.keys import Keys
from service.queue.protocol import Entry, Reply, ensure_group, server_time_ms
from service.settings import FiloSettings

_TAKE_OVER_LUA = """
-- Take over the pending entries of workers whose heartbeat lapsed, then remove each such worker once it holds
-- nothing. Atomic: of two workers running it at once, the first takes the entries, the second finds none left.
-- KEYS[1] stream, KEYS[2] worker heartbeats (zset, score = last beat in ms), KEYS[3] applied versions (hash)
-- ARGV[1] group, ARGV[2] this consumer, ARGV[3] heartbeat TTL in ms, ARGV[4] min idle in ms (XCLAIM's: an entry
-- read or touched more recently stays where it is), ARGV[5] most entries to take
-- Returns {workers removed, entries taken (as XCLAIM gives them), their delivery counts (this one included)}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('(%d', now - tonumber(ARGV[3])))
local left = tonumber(ARGV[5])
local removed, entries, deliveries = {}, {}, {}
for _, name in ipairs(lapsed) do
  if left <= 0 then break end
  if name ~= ARGV[2] then
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', left, name)
    if #pending > 0 then
      local ids, times = {}, {}
      for i, p in ipairs(pending) do ids[i] = p[1]; times[p[1]] = p[4] end
      for _, e in ipairs(redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], unpack(ids))) do
        if e then
          entries[#entries + 1] = e
          deliveries[#deliveries + 1] = times[e[1]] + 1
          left = left - 1
        end
      end
    end
    if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, name) == 0 then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
      redis.call('ZREM', KEYS[2], name)
      redis.call('HDEL', KEYS[3], name)
      removed[#removed + 1] = name
    end
  end
end
return {removed, entries, deliveries}
"""


@dataclass
class TakeOver:
    """One take-over round: the dead workers removed, and the requests taken from them."""

    gone: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)


class Consumer:
    """What a worker does with the stream: read batches, reclaim, reply-and-acknowledge, heartbeat."""

    def __init__(self, redis: Redis, settings: FiloSettings, name: str) -> None:
        self.redis = redis
        self.keys = Keys.from_settings(settings)
        self.name = name
        self.claim_idle_ms = settings.claim_idle_ms
        self.reply_ttl_s = int(settings.request_timeout_s) + 60
        self.heartbeat_ttl_ms = settings.heartbeat_ttl_ms
        self.take_over_idle_ms = settings.heartbeat_interval_ms
        self._take_over = redis.register_script(_TAKE_OVER_LUA)

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

    async def take_over(self, count: int) -> TakeOver:
        """Take over (at most `count`) requests held by workers whose heartbeat lapsed, at once instead of after
        `claim_idle_ms`, and remove each such worker (consumer, heartbeat, applied version) once it holds nothing.

        Only requests left alone for `heartbeat_interval_ms` move (XCLAIM's min-idle): a dead worker's have been
        alone at least `heartbeat_ttl_ms - heartbeat_interval_ms`, while one a worker that is alive after all has
        just read or touched stays with it. Should such a worker still answer one that moved, the request gets two
        equivalent replies on its own list (keyed by its unique id): the API takes one, the other expires unread."""
        keys = [self.keys.stream, self.keys.workers, self.keys.workers_applied]
        args = [self.keys.group, self.name, self.heartbeat_ttl_ms, self.take_over_idle_ms, count]
        try:
            gone, taken, deliveries = await self._take_over(keys=keys, args=args)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return TakeOver()
        entries = []
        for (entry_id, flat), n in zip(taken, deliveries, strict=True):
            if flat:  # an entry deleted after delivery comes back empty
                entries.append(Entry.parse(entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))
                entries[-1].deliveries = int(n)
        return TakeOver([g.decode() for g in gone], entries)

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
