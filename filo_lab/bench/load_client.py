"""The load client: real requests against a running server, counted into throughput, latency and losses.

`filo loadtest` and the serving benchmark (`filo_lab.bench.load`) both drive it. It stops at whichever
bound comes first, `max_requests` or `duration_s`, and counts every request it sent: answered (any HTTP
status) or lost (no answer: connection dropped, timeout). A healthy server loses none. Point it at this
machine only (`is_loopback_url`): a load test is a denial of service to anyone else.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx


def is_loopback_url(url: str) -> bool:
    """Whether the URL names this machine (127.0.0.0/8, ::1, localhost): the only targets a load test may hit."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


@dataclass
class LoadReport:
    """What one load run saw; `summary()` is the form that is printed and compared."""

    sent: int = 0
    answered: int = 0
    ok: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        return {
            "sent": self.sent,
            "answered": self.answered,
            "ok": self.ok,
            "lost": self.lost,
            "seconds": round(self.seconds, 3),
            "throughput_rps": round(self.answered / self.seconds, 3) if self.seconds > 0 else 0.0,
            "latency_ms": {f"p{q}": round(percentile(lat, q), 2) for q in (50, 95, 99)},
            "errors": dict(self.errors),
        }


def synthetic_png(size: int = 256) -> bytes:
    """A plain test image when none is given (the numbers measure the service, not the verdict)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.random((size, size, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


IMAGE_TYPES = {b"\xff\xd8\xff": ("image.jpg", "image/jpeg"), b"\x89PNG": ("image.png", "image/png")}


def upload_name(image: bytes) -> tuple[str, str]:
    """(file name, media type) a client would send for these bytes; the server reads the format from the bytes."""
    for magic, named in IMAGE_TYPES.items():
        if image.startswith(magic):
            return named
    return "image.bin", "application/octet-stream"


async def run_load(url: str, category: str | None, image: bytes, concurrency: int, duration_s: float,
                   max_requests: int, api_key: str | None = None, timeout_s: float = 120.0,
                   fields: dict[str, str] | None = None) -> LoadReport:
    """`concurrency` clients posting `image` to `POST /v1/inspect` until a bound is reached.

    `category` None: the first one the server lists. `fields`: form fields of every request (default
    `heatmap=none`: the service alone, no picture).
    """
    form_fields = {"heatmap": "none"} if fields is None else dict(fields)
    filename, media_type = upload_name(image)
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = LoadReport()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        if category is None:
            listing = (await client.get(f"{base}/v1/categories")).json()
            category = listing["categories"][0]["name"]
        t0 = time.monotonic()
        end = t0 + duration_s

        async def one_client() -> None:
            while time.monotonic() < end and report.sent < max_requests:
                report.sent += 1
                started = time.monotonic()
                try:
                    r = await client.post(f"{base}/v1/inspect", data={"category": category, **form_fields},
                                          files={"image": (filename, image, media_type)})
                except httpx.HTTPError as exc:
                    report.errors[f"no_answer:{type(exc).__name__}"] += 1
                    continue
                report.answered += 1
                report.latencies_ms.append((time.monotonic() - started) * 1e3)
                if r.status_code == 200:
                    report.ok += 1
                else:
                    try:
                        code = r.json()["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "unparseable"
                    report.errors[f"{r.status_code}:{code}"] += 1

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        report.seconds = time.monotonic() - t0
    return report
