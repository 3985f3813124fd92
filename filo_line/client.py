"""The service's HTTP API as the line uses it: `POST /v1/inspect` and `GET /v1/categories`, nothing else.

Every answer is a typed outcome, never an exception: a `Verdict`, or a `Failure` whose reason says what the line
can do about it (`transient` ones may succeed when tried again: the service was slow, busy, away or out of
reach; `refused` ones never will: the image or the request is wrong). The station decides what a failure means
for the PLC; this module only says what happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

PART_ID_PATTERN = re.compile(r"^[A-Za-z0-9\-_.:/]{1,64}$")  # the service's part_id (and source)
REQUEST_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
MAX_DEADLINE_MS = 600_000

FailureReason = Literal["timeout", "refused", "busy", "unavailable", "unreachable", "server_error"]
TRANSIENT: frozenset[str] = frozenset({"timeout", "busy", "unavailable", "unreachable", "server_error"})


@dataclass(frozen=True)
class Verdict:
    """The service's judgement of one image: it decides, the line only carries it."""

    request_id: str
    is_anomalous: bool
    needs_review: bool
    score: float
    threshold: float
    top_type: str | None
    boxes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Failure:
    reason: FailureReason
    message: str
    status: int | None = None  # the HTTP status, when the service answered
    code: str | None = None  # the service's error code (`deadline_exceeded`, `invalid_image`, ...)
    retry_after_s: float | None = None

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT

    def describe(self) -> str:
        head = f"{self.reason}" + (f" ({self.status} {self.code})" if self.status else "")
        return f"{head}: {self.message}"


Outcome = Verdict | Failure


def sanitise_part_id(raw: str) -> str:
    """A part id the service accepts (up to 64 of letters, digits and -_.:/): other characters become '_', a
    longer one keeps its head and a hash of the whole, so two long ids stay two ids."""
    cleaned = re.sub(r"[^A-Za-z0-9\-_.:/]", "_", raw) or "part"
    if len(cleaned) > 64:
        cleaned = f"{cleaned[:55]}~{hashlib.sha256(raw.encode()).hexdigest()[:8]}"
    return cleaned


def request_id_for(station: str, part_id: str, image: bytes) -> str:
    """The part's stable request id: the same station, part and image give the same id after a crash or from the
    spool, so the service keeps one record however often it is sent; another image of the same part id does not
    collide."""
    digest = hashlib.sha256(b"\0".join([station.encode(), part_id.encode(), image])).hexdigest()[:16]
    head = REQUEST_ID_CHARS.sub("_", f"{station}-{part_id}")[:47]
    return f"{head}-{digest}"


def _verdict(body: dict[str, Any]) -> Verdict:
    types = body.get("top_types") or []
    return Verdict(
        request_id=str(body["request_id"]),
        is_anomalous=bool(body["is_anomalous"]),
        needs_review=bool(body.get("needs_review", False)),
        score=float(body["score"]),
        threshold=float(body["threshold"]),
        top_type=types[0]["description"] if types else None,
        boxes=list(body.get("boxes") or []),
    )


def _failure(response: httpx.Response) -> Failure:
    code, message = None, response.text[:300]
    try:
        error = response.json()["error"]
        code, message = error.get("code"), error.get("message", message)
    except (ValueError, KeyError, TypeError):
        pass
    retry = response.headers.get("Retry-After")
    retry_s = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    status = response.status_code
    if status == 429:
        reason: FailureReason = "busy"
    elif status == 503:
        reason = "unavailable"
    elif status in (408, 504):
        reason = "timeout"
    elif status >= 500:
        reason = "server_error"
    else:
        reason = "refused"
    return Failure(reason, message, status, code, retry_s)


class ServiceError(RuntimeError):
    """`GET /v1/categories` failed; the message says how."""


class ServiceClient:
    """One connection pool to the service for all stations; every call bounded in time."""

    def __init__(self, url: str, key: str, connect_timeout_s: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(None, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def inspect(self, image: bytes, name: str, *, category: str, part_id: str, request_id: str, source: str,
                      timeout_s: float, deadline_ms: int | None = None) -> Outcome:
        """Inspect one image within `timeout_s` (the whole exchange); `deadline_ms` tells the service how long
        the line waits, so it answers 504 instead of spending its model on an answer nobody will take."""
        data = {"category": category, "part_id": part_id, "request_id": request_id, "source": source,
                "heatmap": "none"}
        if deadline_ms is not None:
            data["deadline_ms"] = str(max(1, min(MAX_DEADLINE_MS, int(deadline_ms))))
        try:
            response = await asyncio.wait_for(
                self._http.post("/v1/inspect", data=data, files={"image": (name, image)}), timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return Failure("timeout", f"no answer within {timeout_s * 1000:.0f} ms")
        except httpx.TransportError as exc:
            return Failure("unreachable", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if response.status_code == 200:
            try:
                return _verdict(response.json())
            except (ValueError, KeyError, TypeError) as exc:
                return Failure("server_error", f"an answer that is not an inspection: {exc}", 200)
        return _failure(response)

    async def categories(self, timeout_s: float = 5.0) -> list[str]:
        """The names of the categories the service can inspect; raises ServiceError."""
        try:
            response = await asyncio.wait_for(self._http.get("/v1/categories"), timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise ServiceError(f"{self.url}: no answer within {timeout_s:.0f} s") from None
        except httpx.TransportError as exc:
            raise ServiceError(f"{self.url}: unreachable ({type(exc).__name__}: {exc})") from None
        if response.status_code != 200:
            failure = _failure(response)
            raise ServiceError(f"{self.url}: GET /v1/categories answered {failure.describe()}")
        try:
            return [str(c["name"]) for c in response.json()["categories"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceError(f"{self.url}: GET /v1/categories answered something else ({exc})") from None
