"""The review loop's writes to a category: a threshold set by hand (with its review band), the history of
every threshold change, and `learn`, which turns people's judgements into references and a threshold. The
work is done by the workflows (service/workflows/thresholds.py and learn.py); these routes parse and answer.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from service.api.auth import Admin, Reader
from service.api.deps import BackendDep, SettingsDep
from service.api.params import NameParam
from service.api.routes.jobs import job_out
from service.api.schemas import ERROR_RESPONSES, ErrorOut, JobOut, LearnOut, ThresholdsOut
from service.workflows import learn as learning
from service.workflows import thresholds

router = APIRouter(prefix="/v1/categories", tags=["review loop"])


class ThresholdIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=0, le=1, description="the cut by hand; null removes a manual one")
    review_margin: float | None = Field(None, ge=0, le=1, description="results within this of the threshold "
                                        "are answered needs_review and wait in the review queue; 0 turns it off")


@router.put("/{name}/threshold", response_model=ThresholdsOut, responses=ERROR_RESPONSES, summary="Set the threshold and review band by hand")
async def put_threshold(name: NameParam, body: ThresholdIn, backend: BackendDep, who: Admin) -> dict[str, Any]:
    await thresholds.set_by_hand(backend, name, body.model_dump(exclude_unset=True), who.name)
    return await thresholds.overview(backend, name)


@router.get("/{name}/thresholds", response_model=ThresholdsOut, responses=ERROR_RESPONSES, summary="The threshold now and every change to it")
async def get_thresholds(name: NameParam, backend: BackendDep, who: Reader) -> dict[str, Any]:
    who.check_category(name)
    return await thresholds.overview(backend, name)


@router.post("/{name}/learn", response_model=LearnOut,
             responses={**ERROR_RESPONSES, 202: {"model": JobOut, "description": "learning started as a background "
                                                 "job; follow it at GET /v1/jobs/{id} (its Location)"},
                        409: {"model": ErrorOut, "description": "the category already runs a job "
                                                                     "(`details.job_id`)"}},
             summary="Turn reviewed records into references, a threshold and suggested descriptions (admin)")
async def learn(name: NameParam, backend: BackendDep, settings: SettingsDep, who: Admin,
                dry_run: Annotated[bool, Query(description="show the plan, change nothing (answers at once)")] = False
                ) -> Any:
    """A dry run answers the plan (200); learning itself runs as a background job of the category (202)."""
    if dry_run:
        return await learning.learn(backend, settings, name, who.name, dry_run=True)
    job = await learning.start_learning(backend, settings, name, who.name)
    return JSONResponse(job_out(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
