"""The service's domain errors: each carries the HTTP status and the stable code a client branches on.

Raised anywhere below the routes (batching, backends, the worker's replies, security); `service/api/errors.py`
turns them into the one JSON error shape. The table of codes is there, beside the handlers.
"""

from __future__ import annotations

from typing import Any

from service.core.imaging import ImageDecodeError
from service.core.types import InspectError

# ImageDecodeError.code -> HTTP status (see the table above)
IMAGE_ERROR_STATUS = {
    "not_an_image": 415,
    "unsupported_image": 415,
    "truncated_image": 422,
    "decompression_bomb": 422,
}


class ServiceError(Exception):
    """An error with its HTTP status and stable code; raised anywhere below the routes."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, **self.details)


class QueueFullError(ServiceError):
    def __init__(self, message: str = "too many requests queued", retry_after_s: int = 1) -> None:
        super().__init__(429, "queue_full", message, headers={"Retry-After": str(max(1, retry_after_s))})


class DeadlineExceededError(ServiceError):
    def __init__(self, message: str = "no answer within the request deadline") -> None:
        super().__init__(504, "deadline_exceeded", message)


class UnavailableError(ServiceError):
    def __init__(self, code: str, message: str, retry_after_s: int = 1) -> None:
        super().__init__(503, code, message, headers={"Retry-After": str(max(1, retry_after_s))})


class CategoryNotFoundError(ServiceError):
    def __init__(self, name: str | None, known: list[str]) -> None:
        what = "category is required" if not name else f"unknown category {name!r}"
        super().__init__(
            404,
            "unknown_category",
            f"{what}; known categories: {', '.join(sorted(known)) or '(none)'}",
            details={"known_categories": sorted(known)},
        )


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **details}}


def image_error(exc: ImageDecodeError) -> ServiceError:
    """An image the service cannot use, as its HTTP caller sees it (415 or 422 by the decoder's code)."""
    return ServiceError(IMAGE_ERROR_STATUS.get(exc.code, 422), exc.code, exc.message)


def error_from_slot(value: BaseException) -> ServiceError:
    """What a failed slot of a batch means for its HTTP caller."""
    if isinstance(value, ServiceError):
        return value
    if isinstance(value, InspectError):
        return ServiceError(value.status, value.code, value.message)
    return ServiceError(500, "inspection_failed", f"the model failed on this request: {type(value).__name__}")
