"""Failover under load, measured: one of two workers SIGKILLed while it holds requests.

A redis-server, two demo workers and one API (`filo serve`) of its own, all on loopback; `filo loadtest`'s client
sends 320x240 PNGs (no heatmap) from `concurrency` clients for `duration_s`; after `kill_after_s` one worker is
frozen (SIGSTOP) until it is seen holding at least `held` requests and then SIGKILLed. Per run it prints the
latency (p50, p99, slowest), the requests lost, how the survivor took the dead worker's requests over
(`filo_worker_rescued_total{how}`: at once by heartbeat, or by the 15 s idle claim) and how long the API went
on counting the dead worker in `/readyz`:

    PYTHONPATH=$PWD python -m filo_lab.bench.failover --runs 3

These are the figures docs/service.md quotes; they move with what else the machine runs. The test
(tests/test_worker_redis.py) checks the mechanism, never the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from filo_lab.bench.load import _base_env, _spawn
from filo_lab.bench.load_client import LoadReport, run_load
from filo_lab.bench.stack import _free_port, _wait_ready, encode_image, stop_processes

STREAM, GROUP = "filo:requests", "filo-workers"
WORKER_ENV = {"FILO_PROFILE": "demo", "FILO_IMAGE_SIZE": "224", "FILO_GROUNDING": "false",
              "FILO_MAX_BATCH_SIZE": "4", "FILO_MAX_WAIT_MS": "20"}


def pending_by_consumer(r: redis.Redis, stream: str = STREAM, group: str = GROUP) -> dict[str, int]:
    info = r.xpending(stream, group)
    return {c["name"].decode(): int(c["pending"]) for c in info.get("consumers") or []}


def kill_while_holding(pid: int, name: str, r: redis.Redis, held: int, within_s: float = 15.0) -> tuple[float, int]:
    """SIGKILL process `pid` (consumer `name`) while it holds at least `held` pending requests; it is frozen
    (SIGSTOP) while that is looked at, so what it holds at the kill is what was counted. Returns the monotonic
    time of the kill and the requests it held."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        holding = pending_by_consumer(r).get(name, 0)
        if holding >= held:
            os.kill(pid, signal.SIGKILL)
            return time.monotonic(), holding
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise RuntimeError(f"never caught worker {name} holding {held} requests within {within_s} s")


def seconds_until_counted(api_url: str, workers: int, since: float, within_s: float = 30.0) -> float:
    """Seconds from `since` until the API's /readyz counts `workers` live workers."""
    deadline = since + within_s
    while time.monotonic() < deadline:
        if httpx.get(f"{api_url}/readyz", timeout=5).json()["detail"].get("workers") == workers:
            return time.monotonic() - since
        time.sleep(0.05)
    raise RuntimeError(f"/readyz still counts more than {workers} worker(s) after {within_s} s")


def rescued(worker_url: str) -> dict[str, float]:
    """A worker's `filo_worker_rescued_total{how}` counters."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{worker_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("filo_worker_rescued_total{"):
            out[line.split('how="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def load_image() -> bytes:
    """A 320x240 PNG of noise (what the test's load sends too)."""
    return encode_image((np.random.default_rng(3).random((240, 320, 3)) * 255).astype(np.uint8), "PNG")


def run_once(concurrency: int, duration_s: float, kill_after_s: float, held: int, logs: Path) -> dict:
    """One failover run on processes of its own, all stopped at the end."""
    logs.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (scripts/start_redis.sh installs Debian's)")
    rport = _free_port()
    procs = [subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(rport), "--save", "", "--appendonly",
                               "no"], stdout=subprocess.DEVNULL)]
    try:
        env = _base_env({**WORKER_ENV, "FILO_REDIS_URL": f"redis://127.0.0.1:{rport}/0"})
        time.sleep(0.3)
        workers = []
        for i in range(2):
            port = _free_port()
            proc = _spawn(["worker"], {**env, "FILO_WORKER_METRICS_PORT": str(port),
                                       "FILO_WORKER_METRICS_HOST": "127.0.0.1"}, logs / f"worker-{i}.log")
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, 300, proc, logs / f"worker-{i}.log")
            workers.append((proc, url, httpx.get(f"{url}/readyz", timeout=5).json()["detail"]["worker"]))
        aport = _free_port()
        api = _spawn(["serve", "--log-level", "warning"], {**env, "FILO_PORT": str(aport),
                                                           "FILO_REQUEST_TIMEOUT_S": "30"}, logs / "api.log")
        procs.append(api)
        api_url = f"http://127.0.0.1:{aport}"
        _wait_ready(api_url, 120, api, logs / "api.log")
        out: dict[str, LoadReport] = {}
        image = load_image()
        load = threading.Thread(target=lambda: out.update(report=asyncio.run(run_load(
            api_url, "bottle", image, concurrency, duration_s, 100_000, timeout_s=30.0))), daemon=True)
        load.start()
        time.sleep(kill_after_s)
        (victim, _, victim_name), (_, survivor_url, _) = workers
        killed_at, holding = kill_while_holding(victim.pid, victim_name, redis.Redis(port=rport), held)
        victim.wait(10)
        drop_s = seconds_until_counted(api_url, 1, killed_at)
        load.join(duration_s + 60)
        report = out["report"]
        summary = report.summary()
        return {"held_by_victim": holding, "drop_s": round(drop_s, 2),
                "slowest_ms": round(max(report.latencies_ms), 2), "rescued": rescued(survivor_url), **summary}
    finally:
        stop_processes(procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration-s", type=float, default=12.0)
    p.add_argument("--kill-after-s", type=float, default=3.0, help="both workers busy first")
    p.add_argument("--held", type=int, default=3, help="the victim dies holding at least this many requests")
    p.add_argument("--logs", type=Path, default=None, help="where the processes log (default: a temporary dir)")
    args = p.parse_args(argv)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="filo-failover-"))
    print("| run | p50 | p99 | slowest | lost | taken over (heartbeat / idle claim) | dead worker out of `/readyz` |")
    print("|---|---|---|---|---|---|---|")
    for run in range(1, args.runs + 1):
        figures = run_once(args.concurrency, args.duration_s, args.kill_after_s, args.held, logs / f"run-{run}")
        print(f"<!-- {json.dumps(figures)} -->", file=sys.stderr)
        lat = figures["latency_ms"]
        how = figures["rescued"]
        print(f"| {run} | {lat['p50']:.0f} ms | {lat['p99'] / 1000:.2f} s | {figures['slowest_ms'] / 1000:.2f} s | "
              f"{figures['lost']} of {figures['sent']} | {how.get('heartbeat', 0):.0f} / {how.get('idle_claim', 0):.0f} "
              f"| {figures['drop_s']:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
