"""Background jobs of the service (learning from reviews), where every API process can see them.

A job is claimed per category, so one category runs one job at a time and a second request is told which job
runs (409); its state, progress and result are kept where `GET /v1/jobs/{id}` on any API process finds them:
in this process (embedded mode) or in Redis (queue mode). A claim in Redis lapses when the process running the
job stops refreshing it (it died): the job then reads as `lost` and the category is free again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from service.core.errors import ServiceError
from service.core.keys import Keys

JOB_STATES = ("running", "succeeded", "failed", "lost")
KEEP_FINISHED = 200  # embedded mode: finished jobs kept for GET (the oldest go first)
FINISHED_TTL_S = 86_400  # queue mode: how long a finished job stays readable


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Job:
    id: str
    kind: str  # what it does: "learn"
    category: str
    actor: str  # the key (or `cli:<user>`) that started it
    state: str = "running"  # one of JOB_STATES
    stage: str = ""  # what it is doing now, in words
    done: int = 0  # progress: steps done of `total` (0 of 0: not counted yet)
    total: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"code", "message"} when failed
    created_ms: int = field(default_factory=now_ms)
    updated_ms: int = field(default_factory=now_ms)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Job:
        return cls(**json.loads(raw))


class JobRunning(ServiceError):
    """409: the category already runs a job; says which."""

    def __init__(self, job_id: str, category: str) -> None:
        super().__init__(409, "job_running", f"category {category!r} already runs job {job_id}; wait for it "
                         f"(GET /v1/jobs/{job_id})", details={"job_id": job_id})


class JobStore(Protocol):
    async def claim(self, kind: str, category: str, actor: str) -> Job:
        """A new running job for `category`; raises JobRunning while another one runs there."""
        ...

    async def update(self, job: Job) -> None:
        """Store the job's new state (progress, or finished); a finished job frees its category."""
        ...

    async def get(self, job_id: str) -> Job | None: ...


class MemoryJobs:
    """Embedded mode: the one process holds every job."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: dict[str, str] = {}  # category -> job id

    async def claim(self, kind: str, category: str, actor: str) -> Job:
        running = self._running.get(category)
        if running is not None:
            raise JobRunning(running, category)
        job = Job(uuid.uuid4().hex, kind, category, actor)
        self._running[category] = job.id
        self._jobs[job.id] = job
        return job

    async def update(self, job: Job) -> None:
        self._jobs[job.id] = replace(job, updated_ms=now_ms())
        if job.state != "running" and self._running.get(job.category) == job.id:
            del self._running[job.category]
            finished = [k for k, j in self._jobs.items() if j.state != "running"]
            for k in finished[:-KEEP_FINISHED]:
                del self._jobs[k]

    async def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)


class RedisJobs:
    """Queue mode: jobs in Redis, so any API pod answers for them. The category's claim is a key set only if
    absent, refreshed on every update by the pod running the job and lapsing `claim_ttl_s` after its last one."""

    def __init__(self, redis: Any, keys: Keys, claim_ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.claim_ttl_ms = int(claim_ttl_s * 1000)

    async def claim(self, kind: str, category: str, actor: str) -> Job:
        job = Job(uuid.uuid4().hex, kind, category, actor)
        if not await self.redis.set(self.keys.job_claim(category), job.id, nx=True, px=self.claim_ttl_ms):
            running = await self.redis.get(self.keys.job_claim(category))
            raise JobRunning(running.decode() if isinstance(running, bytes) else str(running), category)
        await self.redis.set(self.keys.job(job.id), job.to_json(), px=self.claim_ttl_ms + FINISHED_TTL_S * 1000)
        return job

    async def update(self, job: Job) -> None:
        job = replace(job, updated_ms=now_ms())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.job(job.id), job.to_json(), px=self.claim_ttl_ms + FINISHED_TTL_S * 1000)
            if job.state == "running":
                pipe.pexpire(self.keys.job_claim(job.category), self.claim_ttl_ms)
            await pipe.execute()
        if job.state != "running":  # free the category, if the claim is still this job's
            await self.redis.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                1, self.keys.job_claim(job.category), job.id)

    async def get(self, job_id: str) -> Job | None:
        raw = await self.redis.get(self.keys.job(job_id))
        if raw is None:
            return None
        job = Job.from_json(raw)
        if job.state == "running" and now_ms() - job.updated_ms > self.claim_ttl_ms:
            return replace(job, state="lost", error={"code": "job_lost", "message": "the process running the job "
                                                     "stopped before it finished; start it again"})
        return job
