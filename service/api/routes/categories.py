"""Category listing (any key; a key limited to categories sees its own) and registration (admin key), including
LLM-drafted descriptions."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from descriptions import Category
from service.api.auth import Catalog, require_admin_key
from service.api.body import invalid, json_body, json_request_body
from service.api.deps import BackendDep, SettingsDep
from service.api.params import NameParam
from service.api.schemas import ERROR_RESPONSES, CategoryDetailOut, CategoryIn, CategoryList, CategoryOut
from service.catalog.llm import LLMError, agenerate_descriptions, write_draft
from service.catalog.store import default_state_dir
from service.core.errors import CategoryNotFoundError, ServiceError
from service.workflows.category_state import load_refs

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/categories", tags=["categories"])


def _out(c: Category) -> CategoryOut:
    return CategoryOut(name=c.name, noun=c.noun, descriptions=list(c.descriptions), status="active")


@router.get("", response_model=CategoryList, responses=ERROR_RESPONSES)
async def list_categories(backend: BackendDep, who: Catalog) -> CategoryList:
    """Every category this deployment can inspect (a key limited to categories: those it reaches)."""
    return CategoryList(categories=[_out(c) for c in await backend.list_categories() if who.reaches_category(c.name)])


@router.get("/{name}", response_model=CategoryDetailOut, responses=ERROR_RESPONSES)
async def get_category(name: NameParam, backend: BackendDep, who: Catalog) -> CategoryDetailOut:
    """The category, with the decision rule its next inspection applies (threshold, where it comes from,
    review margin) and its reference count."""
    who.check_category(name)
    found = {c.name: c for c in await backend.list_categories()}
    if name not in found:
        raise CategoryNotFoundError(name, [n for n in found if who.reaches_category(n)])
    rule = await backend.threshold_rule(name)
    return CategoryDetailOut(**_out(found[name]).model_dump(), threshold=rule.threshold, threshold_source=rule.source,
                             review_margin=rule.review_margin, references=len(await load_refs(backend, name)))


@router.put(
    "/{name}",
    response_model=CategoryOut,
    responses={**ERROR_RESPONSES, 202: {"model": CategoryOut, "description": "an LLM draft, not registered"},
               502: ERROR_RESPONSES[503] | {"description": "the LLM endpoint failed"}},
    dependencies=[Depends(require_admin_key)],
    openapi_extra=json_request_body(CategoryIn),
)
async def put_category(
    body: Annotated[CategoryIn, Depends(json_body(CategoryIn))],
    name: NameParam,
    backend: BackendDep,
    settings: SettingsDep,
) -> Response:
    """Register (or replace) a category and build its caches; `generate: true` only drafts descriptions.

    In queue mode the answer waits (up to `category_apply_timeout_s`) until every live worker has
    built the caches and says how many had (`workers_ready` of `workers_live`).

    A draft is written to `<state_dir>/drafts/NAME.json` and returned with status `draft` (202);
    it is not inspectable until a person reviews it and PUTs the descriptions.
    """
    noun = body.noun or name
    if body.generate:
        try:
            texts = await agenerate_descriptions(settings, name, noun, body.count)
        except LLMError as exc:
            raise ServiceError(502, "llm_failed", str(exc)) from None
        path = (settings.state_dir or default_state_dir()) / "drafts" / f"{name}.json"
        try:
            write_draft(path, name, noun, texts, settings.llm_model)
            where: str | None = str(path)
        except OSError as exc:  # e.g. a read-only root filesystem: the draft is in the answer anyway
            log.warning("could not write the draft %s (%s)", path, exc)
            where = None
        out = CategoryOut(name=name, noun=noun, descriptions=texts, status="draft", draft_path=where)
        return JSONResponse(out.model_dump(mode="json"), status_code=202)
    try:
        category = Category(name=name, noun=noun, descriptions=tuple(body.descriptions))
    except ValidationError as exc:
        raise invalid(exc.errors()) from None
    applied = await backend.put_category(category)
    out = _out(category).model_copy(update={"workers_ready": applied.workers_ready,
                                            "workers_live": applied.workers_live})
    return JSONResponse(out.model_dump(mode="json"))


@router.delete("/{name}", status_code=204, responses=ERROR_RESPONSES, dependencies=[Depends(require_admin_key)])
async def delete_category(name: NameParam, backend: BackendDep) -> Response:
    await backend.delete_category(name)
    return Response(status_code=204)
