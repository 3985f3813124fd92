"""Background jobs: GET /v1/jobs/{id} (admin), where a learn started with POST .../learn is followed."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from service.api.auth import Admin
from service.api.deps import BackendDep
from service.api.schemas import ERROR_RESPONSES, JobOut
from service.backends.jobs import Job
from service.workflows import jobs
from service.workflows.records import iso

router = APIRouter(prefix="/v1/jobs", tags=["review loop"])
JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


def job_out(job: Job) -> dict[str, Any]:
    return JobOut(id=job.id, kind=job.kind, category=job.category, actor=job.actor, state=job.state, stage=job.stage,
                  done=job.done, total=job.total, result=job.result, error=job.error, created_at=iso(job.created_ms),
                  updated_at=iso(job.updated_ms)).model_dump(mode="json")


@router.get("/{job_id}", response_model=JobOut, responses=ERROR_RESPONSES, summary="A background job (admin)")
async def get_job(job_id: JobId, backend: BackendDep, _: Admin) -> dict[str, Any]:
    return job_out(await jobs.get(backend, job_id))
