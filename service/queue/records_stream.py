"""The durable hand-off of inspection records in queue mode: API pods append each record to a Redis
stream; a consumer group of record writers (one per API pod) drains it into the records database.

A record leaves the stream only after its transaction committed (XACK, then XDEL), so a database that is
down leaves records waiting in Redis, not lost; a writer that died holding some is taken over after
`records_claim_idle_ms`; and a record delivered twice is written once (the store is idempotent on the id).
The stream holds only what is not yet written: its length is the `pending` figure.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError

from service.core.telemetry import Metrics
from service.records.health import WriteRefused, write_failure_cause
from service.records.model import InspectionRecord
from service.records.recorder import Records
from service.settings import FiloSettings

log = logging.getLogger(__name__)
RETRY_PAUSE_S = (0.5, 1.0, 2.0, 5.0)
READ_BLOCK_MS = 1000

_FORGET_GONE_LUA = """
-- Remove the record writers that are gone from the group: those that hold no entry and have not read for
-- ARGV[2] ms (a live writer reads at least every second). A dead writer's entries are taken over after
-- records_claim_idle_ms (XAUTOCLAIM), and it goes at the next round. Atomic, so an entry is never left
-- without an owner: a writer that read meanwhile holds it, and stays.
-- KEYS[1] stream; ARGV[1] group, ARGV[2] idle in ms, ARGV[3] the writer running this (it stays)
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0 and tonumber(info['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
"""


class StreamFull(WriteRefused):
    """The records stream holds `4 x records_stream_max` entries: the database has been away too long."""

    cause = "stream_full"


class RecordAppender:
    """The producer side, what `RecordBuffer` flushes into in queue mode: one pipeline per batch.

    While the database is away the stream grows, and it shares Redis with the requests. Past
    `records_stream_max` entries the records travel without their artefacts (the image and heatmap are the
    bulk; counted in `filo_records_failed_total{reason="artefacts_dropped"}`); past four times that, nothing
    more is appended and the records wait in this process's bounded buffer instead, so the queue keeps
    its memory. A pod that stops hands that buffer over past the cap (`drain`): at most one buffer per pod
    stopping, without artefacts, so the records outlive the pod and Redis still keeps its memory.
    """

    def __init__(self, redis: Redis, settings: FiloSettings, metrics: Metrics) -> None:
        self.redis = redis
        self.stream = settings.records_stream
        self.soft_max = settings.records_stream_max
        self.metrics = metrics

    async def __call__(self, batch: list[InspectionRecord]) -> None:
        try:
            await self._append(batch, capped=True)
        except Exception as exc:
            self.metrics.records_write_failures.labels(cause=write_failure_cause(exc)).inc()
            raise

    async def drain(self, batch: list[InspectionRecord]) -> None:
        """A stopping pod's last appends: past the cap too, so its buffer is not lost with it."""
        try:
            await self._append(batch, capped=False)
        except Exception as exc:
            self.metrics.records_write_failures.labels(cause=write_failure_cause(exc)).inc()
            raise

    async def _append(self, batch: list[InspectionRecord], capped: bool) -> None:
        length = int(await self.redis.xlen(self.stream))
        if capped and length >= 4 * self.soft_max:
            raise StreamFull(f"the records stream holds {length} entries; the database must be away")
        if length >= self.soft_max:
            stripped = sum(1 for r in batch if r.artefacts)
            batch = [replace(r, artefacts=[]) for r in batch]
            if stripped:
                self.metrics.records_failed.labels(reason="artefacts_dropped").inc(stripped)
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in batch:
                pipe.xadd(self.stream, record.to_wire())  # type: ignore[arg-type]
            await pipe.execute()


class RecordConsumer:
    """Drains the records stream into the database, a batch per transaction; a batch that fails is read again
    in halves, down to one record a transaction, and the size doubles back with each batch written."""

    def __init__(self, redis: Redis, records: Records, settings: FiloSettings, metrics: Metrics, name: str) -> None:
        self.redis = redis
        self.records = records
        self.stream = settings.records_stream
        self.group = settings.records_group
        self.batch = settings.records_batch
        self.claim_idle_ms = settings.records_claim_idle_ms
        self.metrics = metrics
        self.name = name
        self._failures = 0
        self._size = self.batch  # entries in the next transaction
        self._retried: set[bytes] = set()  # entries already counted as retried
        self._forget_gone = redis.register_script(_FORGET_GONE_LUA)
        self._next_sweep = 0.0  # loop time of the next look for writers that are gone

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Own pending entries first (a failed write), then entries of dead writers, then new ones."""
        resp = await self.redis.xreadgroup(self.group, self.name, {self.stream: "0"}, count=self._size)
        entries = [(i, f) for i, f in (resp[0][1] if resp else []) if f]  # f empty: deleted meanwhile
        if entries:
            return entries
        claimed = await self.redis.xautoclaim(self.stream, self.group, self.name, self.claim_idle_ms,
                                              start_id="0-0", count=self._size)
        entries = [(i, f) for i, f in claimed[1] if f]
        if entries:
            return entries
        resp = await self.redis.xreadgroup(self.group, self.name, {self.stream: ">"}, count=self._size,
                                           block=READ_BLOCK_MS)
        return resp[0][1] if resp else []

    async def drain_once(self) -> int:
        """Read, write and acknowledge one batch; returns how many entries were settled."""
        entries = await self._read()
        if not entries:
            return 0
        good: list[InspectionRecord] = []
        for entry_id, fields in entries:
            try:
                good.append(InspectionRecord.from_wire(fields))
            except (KeyError, TypeError, ValueError) as exc:  # never retried forever: counted and settled
                log.error("records stream entry %r is unreadable, dropped: %s", entry_id, exc)
                self.metrics.records_failed.labels(reason="unreadable").inc()
        ids = [entry_id for entry_id, _ in entries]
        try:
            await self.records.write(good)
        except Exception:
            fresh = [i for i in ids if i not in self._retried]
            if len(self._retried) > 16 * self.batch:  # entries another writer took over meanwhile: forget them
                self._retried.clear()
            self._retried.update(fresh)
            self.metrics.records_failed.labels(reason="retried").inc(len(fresh))
            self._size = max(1, self._size // 2)
            raise
        self._size = min(self.batch, self._size * 2)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()
        self._retried.difference_update(ids)
        return len(ids)

    async def forget_gone(self) -> list[str]:
        """Remove the writers of API processes that stopped or died (holding nothing, idle past
        `records_claim_idle_ms`) from the group, as the request group's dead workers are; returns their names."""
        try:
            gone = await self._forget_gone(keys=[self.stream], args=[self.group, self.claim_idle_ms, self.name])
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            return []
        names = [g.decode() if isinstance(g, bytes) else str(g) for g in gone]
        if names:
            log.info("records writers gone, removed from the group: %s", ", ".join(names))
        return names

    async def leave(self) -> None:
        """On a clean stop: leave the group, unless this writer still holds entries (another takes them over)."""
        try:
            info = await self.redis.xinfo_consumers(self.stream, self.group)
        except ResponseError:
            return
        for c in info:
            if c["name"] in (self.name, self.name.encode()) and int(c["pending"]) == 0:
                await self.redis.xgroup_delconsumer(self.stream, self.group, self.name)

    async def run(self) -> None:
        await self._ensure_group_until_done()
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() >= self._next_sweep:
                    self._next_sweep = loop.time() + self.claim_idle_ms / 1000
                    await self.forget_gone()
                await self.drain_once()
                self._failures = 0
            except (SQLAlchemyError, RedisError, RuntimeError, OSError) as exc:
                self._failures += 1
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.warning("records writer: %s (attempt %d); the records stay in the stream", exc,
                                self._failures)
                await asyncio.sleep(RETRY_PAUSE_S[min(self._failures, len(RETRY_PAUSE_S)) - 1])

    async def _ensure_group_until_done(self) -> None:
        while True:
            try:
                await self.ensure_group()
                return
            except (RedisError, OSError) as exc:
                log.warning("records writer cannot reach Redis yet: %s", exc)
                await asyncio.sleep(RETRY_PAUSE_S[-1])

    async def pending(self) -> int:
        return int(await self.redis.xlen(self.stream))
