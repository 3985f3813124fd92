"""`filo loadtest`: real requests against a running server on this machine; throughput, latency, losses.

Loopback only (127.0.0.0/8, ::1, localhost): a load test is a denial of service to anyone else.
It stops at whichever bound comes first, `--requests` or `--duration`, and counts every request
it sent: answered (any HTTP status) or lost (no answer: connection dropped, timeout). A healthy
server loses none; the exit status is 1 when any was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx


def is_loopback_url(url: str) -> bool:
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
    """A plain test image when no --image is given (the numbers measure the service, not the verdict)."""
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
    """`fields`: form fields of every request (default `heatmap=none`: the service alone, no picture)."""
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("loadtest", help="load-test a server on this machine", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=30.0, help="stop after this many seconds")
    p.add_argument("--requests", type=int, default=1000, help="stop after this many requests")
    p.add_argument("--category", help="default: the first category the server lists")
    p.add_argument("--image", type=Path, help="image file to send (default: a synthetic 256x256 PNG)")
    p.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                   help="form field of every request (repeatable; default heatmap=none), e.g. heatmap=jpeg")
    p.add_argument("--api-key", help="bearer API key")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if not is_loopback_url(args.url):
        print(f"filo loadtest: refusing {args.url}: only 127.0.0.0/8, ::1 or localhost", file=sys.stderr)
        return 2
    if args.concurrency < 1 or args.requests < 1 or args.duration <= 0:
        print("filo loadtest: --concurrency, --requests and --duration must be positive", file=sys.stderr)
        return 2
    bad = [f for f in args.field if "=" not in f]
    if bad:
        print(f"filo loadtest: --field takes NAME=VALUE, got {bad}", file=sys.stderr)
        return 2
    fields = dict(f.split("=", 1) for f in args.field) if args.field else None
    image = args.image.read_bytes() if args.image else synthetic_png()
    report = asyncio.run(run_load(args.url, args.category, image, args.concurrency, args.duration, args.requests,
                                  args.api_key, args.timeout, fields))
    s = report.summary()
    if args.json:
        print(json.dumps(s))
    else:
        lat = s["latency_ms"]
        print(f"sent {s['sent']}, answered {s['answered']} ({s['ok']} ok), lost {s['lost']} in {s['seconds']} s")
        print(f"throughput {s['throughput_rps']} req/s; latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, "
              f"p99 {lat['p99']} ms")
        for code, n in sorted(s["errors"].items()):
            print(f"  error {code}: {n}")
    return 1 if report.lost else 0
