"""Fixtures and helpers for the service tests: a real redis-server, real HTTP servers, real workers.

Import what you use into a test module (`from tests.service_fixtures import redis_server, ...`);
tests/conftest.py belongs to the lead. Every process started here is stopped by its fixture's
finalizer, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import uvicorn
from PIL import Image
from typing_extensions import Self

from service.settings import FiloSettings

REPO = Path(__file__).resolve().parents[1]
REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Ask a server process to stop (`sig`), and kill it when it has not after `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def png_bytes(h: int = 96, w: int = 128, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def demo_settings(**overrides: object) -> FiloSettings:
    """The demo profile, made fast for 2 CPU cores: small frame, no Grounding DINO unless asked."""
    base: dict[str, object] = {"profile": "demo", "image_size": 224, "grounding": False, "max_wait_ms": 5,
                               "request_timeout_s": 60.0}
    if "state_dir" not in overrides and "records_url" not in overrides:  # never the user's ~/.cache
        base["records_url"] = f"sqlite:///{tempfile.mkdtemp(prefix='filo-records-')}/records.db"
    base.update(overrides)
    return FiloSettings(**base)


# --- redis-server ----------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        stop_process(self.proc)


def _start_redis_server(port: int, *args: str) -> RedisServer:
    proc = subprocess.Popen(
        [REDIS_BIN, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--protected-mode", "yes", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port, proc)
    try:
        wait_until(lambda: server.client().ping(), 15, what=f"redis-server on {port}")
    except TimeoutError:
        server.stop()
        raise
    return server


def start_redis() -> RedisServer:
    return _start_redis_server(free_port(), "--appendonly", "no")


def start_persistent_redis(data_dir: Path, port: int | None = None) -> RedisServer:
    """A redis-server with append-only persistence in `data_dir`; start it again on the same port and
    directory to restart it from its AOF."""
    return _start_redis_server(port or free_port(), "--appendonly", "yes", "--appendfsync", "always",
                               "--dir", str(data_dir))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server on a free loopback port for the whole session."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server, emptied before each test."""
    redis_server.client().flushall()
    yield redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that stop it."""
    server = start_redis()
    yield server
    server.stop()


# --- HTTP servers in a thread -----------------------------------------------------------------------------


class ServerThread:
    """A real uvicorn server for `app` on a free loopback port, in a daemon thread; an API app (one with
    its FiloSettings on `app.state`) runs under the configuration `filo serve` uses (the bounded h11)."""

    def __init__(self, app: object) -> None:
        from service.api.server import serve_config

        self.port = free_port()
        settings = getattr(getattr(app, "state", None), "settings", None)
        kwargs: dict = {"host": "127.0.0.1", "port": self.port, "log_level": "warning", "lifespan": "on"}
        config = (serve_config(app, settings, **kwargs) if isinstance(settings, FiloSettings)
                  else uvicorn.Config(app, **kwargs))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, what="uvicorn start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def wait_ready(url: str, timeout: float = 120.0) -> dict:
    """Poll /readyz until 200; returns its body."""
    box: dict = {}

    def ready() -> bool:
        r = httpx.get(f"{url}/readyz", timeout=5)
        box.update(r.json())
        return r.status_code == 200

    wait_until(ready, timeout, interval=0.2, what=f"{url}/readyz")
    return box


# --- worker subprocesses ------------------------------------------------------------------------------------


@dataclass
class WorkerProc:
    proc: subprocess.Popen
    metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, 20)


def worker_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILO_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(settings_env)
    return env


class WorkerPool:
    """Starts `filo worker` subprocesses; stops all of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.workers: list[WorkerProc] = []

    def start(self, redis_url: str, **env: str) -> WorkerProc:
        port = free_port()
        log_path = self.tmp_path / f"worker-{len(self.workers)}.log"
        settings_env = {"FILO_PROFILE": "demo", "FILO_IMAGE_SIZE": "224", "FILO_GROUNDING": "false",
                        "FILO_REDIS_URL": redis_url, "FILO_WORKER_METRICS_PORT": str(port),
                        "FILO_MAX_WAIT_MS": "20", "FILO_WORKER_METRICS_HOST": "127.0.0.1"}
        settings_env.update(env)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=REPO,
                                    env=worker_env(settings_env), stdout=log, stderr=subprocess.STDOUT)
        w = WorkerProc(proc, port, log_path)
        self.workers.append(w)
        return w

    def wait_ready(self, w: WorkerProc, timeout: float = 120.0) -> dict:
        try:
            return wait_ready(w.url, timeout)
        except TimeoutError:
            raise AssertionError(f"worker not ready; log:\n{w.log()[-3000:]}") from None

    def stop_all(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.stop()


@pytest.fixture
def worker_pool(tmp_path: Path) -> Iterator[WorkerPool]:
    pool = WorkerPool(tmp_path)
    yield pool
    pool.stop_all()


# --- background jobs ----------------------------------------------------------------------------------------


def learn_and_wait(client: Any, category: str, headers: dict[str, str] | None = None, timeout: float = 180.0) -> dict:
    """POST .../learn (a background job: 202 with its Location), followed to its end; the job's result."""
    r = client.post(f"/v1/categories/{category}/learn", headers=headers or {})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}" and job["state"] == "running" and job["kind"] == "learn"
    box: dict[str, Any] = {}

    def finished() -> bool:
        box["job"] = client.get(f"/v1/jobs/{job['id']}", headers=headers or {}).json()
        return box["job"]["state"] != "running"

    wait_until(finished, timeout, interval=0.2, what=f"the learn job of {category}")
    assert box["job"]["state"] == "succeeded", box["job"]
    return box["job"]["result"]
