"""The API side of the queue: enqueue a request, wait for its reply, report depth and live workers.

The wire format and the design are in service/queue/protocol.py.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from service.core.keys import Keys
from service.queue.protocol import Job, Reply, server_time_ms
from service.settings import FiloSettings

_ENQUEUE_LUA = """
-- KEYS[1] stream, KEYS[2] categories hash, KEYS[3] categories version (exists once seeded),
-- KEYS[4] worker heartbeats (zset, score = last beat in ms)
-- ARGV[1] max depth, ARGV[2] category, ARGV[3] heartbeat window in ms (0: do not require a live
-- worker), ARGV[4..] field/value pairs of the entry
if redis.call('EXISTS', KEYS[3]) == 0 then return {-3, 0} end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return {-1, 0} end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {-2, depth} end
local window = tonumber(ARGV[3])
if window > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if redis.call('ZCOUNT', KEYS[4], now - window, '+inf') == 0 then return {-4, depth} end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4, #ARGV))
return {id, depth + 1}
"""

ENQUEUED, UNKNOWN_CATEGORY, QUEUE_FULL, NOT_SEEDED = "enqueued", "unknown_category", "queue_full", "not_seeded"
NO_WORKERS = "no_workers"


class Producer:
    """What an API process does with the stream: enqueue, wait for the reply, report depth and workers."""

    def __init__(self, redis: Redis, settings: FiloSettings) -> None:
        self.redis = redis
        self.keys = Keys.from_settings(settings)
        self.max_depth = settings.queue_max_depth
        self.require_worker = settings.reject_without_workers
        self.reply_ttl_s = int(settings.request_timeout_s) + 60
        self.heartbeat_ttl_ms = settings.heartbeat_ttl_ms  # a worker silent for longer is dead
        self._enqueue = redis.register_script(_ENQUEUE_LUA)

    async def enqueue(self, job: Job) -> tuple[str, int]:
        """Returns (outcome, depth): ENQUEUED, UNKNOWN_CATEGORY, QUEUE_FULL, NOT_SEEDED or NO_WORKERS."""
        fields = job.fields(self.keys.reply(job.request_id))
        argv: list[Any] = [self.max_depth, job.category, self.heartbeat_ttl_ms if self.require_worker else 0]
        for k, v in fields.items():
            argv += [k, v]
        res = await self._enqueue(
            keys=[self.keys.stream, self.keys.categories, self.keys.categories_version, self.keys.workers],
            args=argv
        )
        code, depth = res[0], int(res[1])
        if isinstance(code, bytes):
            return ENQUEUED, depth
        return {-1: UNKNOWN_CATEGORY, -2: QUEUE_FULL, -3: NOT_SEEDED, -4: NO_WORKERS}[int(code)], depth

    async def wait_reply(self, request_id: str, timeout_s: float) -> Reply | None:
        """Block until the reply arrives or `timeout_s` passes (None)."""
        if timeout_s <= 0:
            return None
        key = self.keys.reply(request_id)
        got = await self.redis.blpop([key], timeout=max(0.01, round(timeout_s, 3)))
        if got is None:
            return None
        return Reply.decode(got[1])

    async def depth(self) -> int:
        return int(await self.redis.xlen(self.keys.stream))

    async def workers_alive(self) -> int:
        """Live workers: a heartbeat within `heartbeat_ttl_ms`. Forgets workers silent for six TTLs (crashed ones
        never `leave`; other workers normally remove them sooner, when they take over their requests)."""
        now = await server_time_ms(self.redis)
        gone = await self.redis.zrangebyscore(self.keys.workers, 0, now - 6 * self.heartbeat_ttl_ms)
        if gone:
            await self.redis.zrem(self.keys.workers, *gone)
            await self.redis.hdel(self.keys.workers_applied, *gone)
        return int(await self.redis.zcount(self.keys.workers, now - self.heartbeat_ttl_ms, "+inf"))

    async def workers_applied(self, version: int) -> tuple[int, int]:
        """(live workers that have applied categories `version` or later, live workers)."""
        now = await server_time_ms(self.redis)
        live = await self.redis.zrangebyscore(self.keys.workers, now - self.heartbeat_ttl_ms, "+inf")
        if not live:
            return 0, 0
        applied = await self.redis.hmget(self.keys.workers_applied, live)
        return sum(int(v or 0) >= version for v in applied), len(live)
