"""The service end to end under load: embedded or queue mode, images/s, latency, CPU per image.

Starts real processes on loopback (`filo serve --embedded`, or a redis-server, one `filo worker` and one
`filo serve`), sends photo-like JPEGs through `POST /v1/inspect` from `concurrency` clients for a bounded
time (`load_client`, the client `filo loadtest` drives too), and reads each process's CPU from the kernel's
accounting, so the figures include everything a process does (HTTP, decode, resize, the model's host side,
rendering). The worker's own stage counters (`filo_worker_cpu_seconds_total{stage}`) split out its non-model
work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filo_lab.bench.load_client import run_load
from filo_lab.bench.stack import (
    IMAGE_SIZES,
    _free_port,
    _wait_ready,
    encode_image,
    photo_like,
    process_cpu_s,
    stop_processes,
    worker_stage_cpu_s,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    """What one serving configuration started; `pids` are the processes whose CPU is counted."""

    mode: str  # "embedded" | "queue"
    api_url: str
    pids: dict[str, int]
    worker_url: str | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def worker_stage_cpu_s(self) -> dict[str, float]:
        return {} if self.worker_url is None else worker_stage_cpu_s(self.worker_url)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, env=env)


def _base_env(model_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILO_")}
    pythonpath = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "FILO_ALLOW_OPEN": "true",
                "FILO_MAX_BODY_BYTES": str(64 << 20), "HF_HUB_OFFLINE": "1", **model_env})
    return env


@contextlib.contextmanager
def start_stack(mode: str, model_env: dict[str, str], logs: Path, ready_timeout_s: float = 300.0,
                redis_bin: str | None = None) -> Iterator[Stack]:
    """A serving configuration, stopped (every process it started) on exit. Logs go to `logs/`."""
    logs.mkdir(parents=True, exist_ok=True)
    env = _base_env(model_env)
    procs: list[subprocess.Popen] = []
    try:
        if mode == "embedded":
            port = _free_port()
            api = _spawn(["serve", "--embedded", "--log-level", "warning"], {**env, "FILO_PORT": str(port)},
                         logs / "embedded.log")
            procs.append(api)
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, ready_timeout_s, api, logs / "embedded.log")
            yield Stack(mode, url, {"api": api.pid}, procs=procs)
            return
        binary = redis_bin or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (scripts/gpu_prepare.sh brings Debian's)")
        rport = _free_port()
        procs.append(subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(rport), "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL))
        env["FILO_REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
        time.sleep(0.3)
        wport, aport = _free_port(), _free_port()
        worker = _spawn(["worker"], {**env, "FILO_WORKER_METRICS_PORT": str(wport),
                                     "FILO_WORKER_METRICS_HOST": "127.0.0.1"}, logs / "worker.log")
        procs.append(worker)
        worker_url = f"http://127.0.0.1:{wport}"
        _wait_ready(worker_url, ready_timeout_s, worker, logs / "worker.log")
        api = _spawn(["serve", "--log-level", "warning"], {**env, "FILO_PORT": str(aport)}, logs / "api.log")
        procs.append(api)
        url = f"http://127.0.0.1:{aport}"
        _wait_ready(url, 120, api, logs / "api.log")
        yield Stack(mode, url, {"api": api.pid, "worker": worker.pid}, worker_url, procs)
    finally:
        stop_processes(procs)


def test_images(sizes: list[str]) -> dict[str, bytes]:
    """Photo-like JPEGs (quality 90, as a camera sends them) of the named sizes (service_bench.IMAGE_SIZES)."""
    return {s: encode_image(photo_like(*IMAGE_SIZES[s], seed=i), "JPEG") for i, s in enumerate(sizes)}


def measure(stack: Stack, image: bytes, category: str, concurrency: int, duration_s: float,
            fields: dict[str, str] | None = None, warmup_requests: int = 4) -> dict:
    """One load case: throughput, latency and each process's CPU ms per answered request."""
    asyncio.run(run_load(stack.api_url, category, image, min(concurrency, warmup_requests), 60, warmup_requests,
                         fields=fields))
    cpu0 = {name: process_cpu_s(pid) for name, pid in stack.pids.items()}
    stages0 = stack.worker_stage_cpu_s()
    report = asyncio.run(run_load(stack.api_url, category, image, concurrency, duration_s, 100_000, fields=fields))
    cpu1 = {name: process_cpu_s(pid) for name, pid in stack.pids.items()}
    stages1 = stack.worker_stage_cpu_s()
    s = report.summary()
    n = max(1, report.ok)
    out = {"mode": stack.mode, "concurrency": concurrency, "image_kb": round(len(image) / 1024, 1), **s,
           "images_per_s": round(report.ok / report.seconds, 2) if report.seconds else 0.0,
           "cpu_ms_per_image": {k: round((cpu1[k] - cpu0[k]) / n * 1e3, 2) for k in cpu0}}
    if stages1:
        out["worker_stage_cpu_ms_per_image"] = {k: round((stages1[k] - stages0.get(k, 0.0)) / n * 1e3, 2)
                                                for k in stages1}
    return out

