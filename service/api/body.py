"""JSON request bodies, read after the key check.

FastAPI decodes a body declared as a route parameter before it solves any dependency, so a
malformed body would be answered 422 (or 400) before the key is looked at. Routes therefore read
their JSON body through `json_body(Model)`, a dependency that runs after the route's auth
dependencies, and document it with `json_request_body(Model)`:

- a content type other than JSON: 415 `unsupported_media_type`;
- bytes that are not UTF-8 (RFC 8259 allows nothing else): 400 `bad_request`;
- malformed JSON, or JSON the model refuses: 422 `validation_error` / `missing_field`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.api.errors import validation_body
from service.core.errors import ServiceError

M = TypeVar("M", bound=BaseModel)


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters ('' when none is declared)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(ctype: str) -> bool:
    return ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))


def invalid(errors: Any) -> ServiceError:
    """A 422 ServiceError from pydantic/FastAPI validation errors (the body `validation_body` gives)."""
    body = validation_body(errors)["error"]
    return ServiceError(422, body["code"], body["message"], details={"fields": body["fields"]})


def parse_json(model: type[M], raw: bytes) -> M:
    """`raw` as `model`: 400 `bad_request` for bytes that are not UTF-8, 422 for anything else wrong."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceError(400, "bad_request", f"the JSON body is not UTF-8 (byte {exc.start})") from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid(exc.errors()) from None


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency that reads and validates the JSON body as `model` (declare it after the auth)."""

    async def read(request: Request) -> M:
        ctype = media_type(request)
        if not is_json(ctype):
            raise ServiceError(415, "unsupported_media_type", f"send application/json, not {ctype or 'no content type'!r}")
        return parse_json(model, await request.body())

    return read


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting `model` as the operation's required JSON body."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
