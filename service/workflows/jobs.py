"""Long category work as a background job: claimed per category, run as a task of this process, its progress
and outcome stored where every API process reads them (service/backends/jobs.py).

The request that starts a job is answered at once (202 with the job); the work reports its steps through
`Progress`; a `ServiceError` it raises is the job's error (its code and message), anything else is
`job_failed`. A job whose process dies reads as `lost` once its claim lapses, and the category is free again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from service.backends.base import Backend
from service.backends.jobs import Job
from service.core.errors import ServiceError

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # at most one progress write a second (and one per stage change), however many steps

_tasks: set[asyncio.Task] = set()  # running jobs, held so the event loop does not drop them


class Progress:
    """What a running job tells its readers: the stage it is in and its steps done of the total."""

    def __init__(self, backend: Backend, job: Job) -> None:
        self.backend = backend
        self.job = job
        self._written = 0.0

    async def stage(self, stage: str, total: int = 0) -> None:
        self.job = replace(self.job, stage=stage, done=0, total=total)
        await self._write()

    async def step(self, n: int = 1) -> None:
        self.job = replace(self.job, done=self.job.done + n)
        if time.monotonic() - self._written >= PROGRESS_EVERY_S or self.job.done == self.job.total:
            await self._write()

    async def _write(self) -> None:
        self._written = time.monotonic()
        await self.backend.jobs.update(self.job)


Work = Callable[[Progress], Awaitable[dict[str, Any]]]


async def start(backend: Backend, kind: str, category: str, actor: str, work: Work) -> Job:
    """Claim the category for a job of `kind` (409 `job_running` while one runs) and run `work` in the background."""
    job = await backend.jobs.claim(kind, category, actor)
    task = asyncio.get_running_loop().create_task(_run(backend, job, work), name=f"filo-job-{kind}-{job.id}")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return job


async def _run(backend: Backend, job: Job, work: Work) -> None:
    progress = Progress(backend, job)
    try:
        result = await work(progress)
        final = replace(progress.job, state="succeeded", result=result)
    except ServiceError as exc:
        final = replace(progress.job, state="failed", error={"code": exc.code, "message": exc.message})
    except Exception as exc:  # the job's own failure: reported on the job, never lost in a log alone
        log.exception("job %s (%s of %s) failed", job.id, job.kind, job.category)
        final = replace(progress.job, state="failed",
                        error={"code": "job_failed", "message": f"{type(exc).__name__}: {exc}"})
    try:
        await backend.jobs.update(final)
    except Exception:
        log.exception("job %s finished (%s) but its state could not be stored", job.id, final.state)


async def get(backend: Backend, job_id: str) -> Job:
    job = await backend.jobs.get(job_id)
    if job is None:
        raise ServiceError(404, "unknown_job", f"no job {job_id!r} (unknown, or finished long ago)")
    return job
