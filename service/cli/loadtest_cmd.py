"""`filo loadtest`: real requests against a running server on this machine; throughput, latency, losses.

Loopback only (127.0.0.0/8, ::1, localhost): a load test is a denial of service to anyone else.
It stops at whichever bound comes first, `--requests` or `--duration`, and counts every request
it sent: answered (any HTTP status) or lost (no answer: connection dropped, timeout). A healthy
server loses none; the exit status is 1 when any was lost. The client is the lab's
(`filo_lab.bench.load_client`), the one the serving benchmark drives too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


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
    from filo_lab.bench.load_client import is_loopback_url, run_load, synthetic_png

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
