"""Every error the service answers with, and the one JSON shape they all share.

Clients get `{"error": {"code", "message", ...}}` for every failure, whatever raised it (our
code, FastAPI's validation, Starlette's routing), so they can branch on `code` alone. The codes
and statuses (documented in the OpenAPI description too):

| status | code | when |
| --- | --- | --- |
| 400 | bad_request | the body cannot be parsed: malformed multipart, or a JSON body that is not UTF-8 |
| 401 | unauthorized | missing or wrong bearer key (checked before the body is read) |
| 403 | forbidden | a valid key whose role may not do this: a camera key reading records, a reader key inspecting, a key other than the admin key writing |
| 403 | outside_key_limits | a limited key (`FILO_KEY_LIMITS`) asking for a category or source outside its limits |
| 404 | unknown_category | category missing or not registered (lists the known ones) |
| 404 | unknown_reference | no reference with that id in the category |
| 404 | not_found | no such route |
| 404 | unknown_inspection / artefact_not_kept | no such inspection record (or purged); its image or heatmap was not kept |
| 404 | records_disabled | inspection records are off (`FILO_RECORDS=false`) |
| 405 | method_not_allowed | the path exists, the method does not; `Allow` lists every method it serves |
| 409 | model_changed | calibration images scored by different model versions (a rolling deploy) |
| 413 | body_too_large | body over `max_body_bytes` (checked while it streams in) |
| 413 | too_many_references | a category would hold more than `reference_max_images` |
| 415 | unsupported_media_type | body neither multipart/form-data nor JSON (JSON only where the route takes JSON) |
| 415 | not_an_image / unsupported_image | the bytes are no image we can decode, or it is under 2x2 pixels |
| 422 | truncated_image / decompression_bomb | an image, but cut short or over `max_image_pixels` (the message says the limit) |
| 422 | missing_field | a required field (`category`, `image`) is absent; `fields` names it |
| 422 | validation_error / invalid_base64 | bad parameters, malformed JSON, or a category name outside the name rule |
| 422 | invalid_cursor | a records page `cursor` this server did not give out |
| 422 | not_enough_references | calibrating from references needs at least 2 |
| 429 | queue_full | too many requests queued; retry after `Retry-After` seconds |
| 431 | headers_too_large | request line and headers over `max_header_bytes` (64 KiB); the connection is closed |
| 500 | inspection_failed / poison_request | the model failed on this request (alone) |
| 502 | llm_failed | `generate: true`: the LLM endpoint failed |
| 503 | records_unavailable | the records database cannot be reached (inspections go on; records wait) |
| 503 | not_ready / redis_unavailable / no_workers / shutting_down | still warming up, the queue cannot be reached, no worker is alive to run it, or the process is stopping |
| 504 | deadline_exceeded | no answer within `request_timeout_s` |

Every response carries `X-Content-Type-Options: nosniff`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.core.errors import ServiceError, error_body

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "queue_full",
    500: "internal_error",
    503: "unavailable",
    504: "deadline_exceeded",
}


def error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _count(request: Request, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(code)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to the one error shape (FastAPI's 422 and Starlette's 404/405 too)."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        _count(request, exc.code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count(request, "validation_error")
        return JSONResponse(validation_body(exc.errors()), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        _count(request, code)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client left, or BodyLimitMiddleware cut the body off and already answered 413
        return JSONResponse(error_body("client_disconnected", "the client went away"), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        _count(request, "internal_error")
        return JSONResponse(error_body("internal_error", "internal error; see the server log"), status_code=500,
                            headers={"X-Content-Type-Options": "nosniff"})  # answered outside NoSniffMiddleware


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (FastAPI makes one route per method)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        regex, served = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and served and regex.match(path):
            methods |= set(served)
    return sorted(methods)


def validation_body(errors: Any) -> dict[str, Any]:
    """422 body for pydantic/FastAPI validation errors: a readable message plus the field list.

    The code is `missing_field` when every problem is a required field left out (clients can tell
    "you forgot `category`" from "`top_k` is out of range"), `validation_error` otherwise."""
    errors = list(errors)
    fields = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header"))
        fields.append({"field": loc, "message": e.get("msg", "")})
    message = "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields) or "invalid request"
    missing = bool(errors) and all(e.get("type") == "missing" for e in errors)
    if missing:
        message = f"missing required field(s): {', '.join(f['field'] for f in fields)}"
    return error_body("missing_field" if missing else "validation_error", message, fields=fields)
