"""`filo bench --service`: what the path around the model costs per request, on the machine it runs on.

It starts a real queue-mode stack (a redis-server of its own unless `redis_url` is given, one demo
`filo worker`, one `filo serve` API process), sends photo-like images (1 MP, 1.5 MP, 5 MP; PNG and
JPEG) through `POST /v1/inspect` one after another, and reports per request:

* the CPU milliseconds of the API process (from the kernel's accounting of that process, so HTTP
  parsing, validation, Redis traffic and the JSON answer all count), less its idle rate;
* the CPU milliseconds of the worker's non-model work (decode, preprocessing, heatmap rendering,
  result encoding), from the worker's own `filo_worker_cpu_seconds_total{stage}` counters;
* the size of the HTTP response;

each also as a ratio to one decode of that image (the project's `decode_image`, measured here in
the same run, median of a few), because the machine is shared and noisy and ratios travel.
The model itself is the tiny demo model: its time is not part of these figures.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
from PIL import Image

from service.core.imaging import decode_image

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZES: dict[str, tuple[int, int]] = {"1MP": (866, 1155), "1.5MP": (1000, 1500), "5MP": (1944, 2592)}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A synthetic photograph: smooth lighting, objects with soft edges, mid-scale texture, sensor grain.

    Noise images compress and decode unlike photographs (no JPEG can shrink them, PNG barely), so
    costs measured on noise say little about a camera's pictures.
    """
    rng = np.random.default_rng(seed)

    def field(cells: int, amplitude: float) -> np.ndarray:
        low = rng.random((max(2, h * cells // max(h, w)), max(2, w * cells // max(h, w)), 3)).astype(np.float32)
        return cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) * amplitude

    img = 60 + field(4, 120) + field(40, 25)
    for _ in range(12):  # objects: filled ellipses and rectangles, blurred edges
        colour = rng.uniform(20, 235, 3).tolist()
        cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        ax, ay = int(rng.uniform(0.03, 0.2) * w), int(rng.uniform(0.03, 0.2) * h)
        if rng.random() < 0.5:
            cv2.ellipse(img, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:
            cv2.rectangle(img, (cx - ax, cy - ay), (cx + ax, cy + ay), colour, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    img += rng.normal(0, 3.0, img.shape).astype(np.float32)  # sensor grain
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_image(rgb: np.ndarray, fmt: str) -> bytes:
    """As a camera or a client would send it: JPEG quality 90, PNG at zlib's default level."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decode_ms(data: bytes, repeats: int = 5) -> float:
    """CPU ms of one `decode_image` of `data` on this thread (median of `repeats`)."""
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        decode_image(data, 200_000_000)
        times.append((time.thread_time() - t0) * 1e3)
    return float(np.median(times))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, its threads (living and ended) included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited early:\n{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s:\n{log.read_text(errors='replace')[-2000:]}")


@dataclass
class ServiceStack:
    """Redis + one demo worker + one API process, all local; `stop()` ends what it started."""

    api_url: str
    worker_url: str
    api_pid: int
    procs: list[subprocess.Popen]
    tmp: Path

    @classmethod
    @contextlib.contextmanager
    def start(cls, redis_url: str | None = None, repo: Path = REPO) -> Iterator[ServiceStack]:
        tmp = Path(tempfile.mkdtemp(prefix="filo-bench-service-"))
        procs: list[subprocess.Popen] = []
        try:
            if redis_url is None:
                binary = shutil.which("redis-server")
                if binary is None:
                    raise RuntimeError("redis-server not found: install it (apt-get install redis-server) "
                                       "or pass --redis-url")
                port = _free_port()
                procs.append(subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                               "--appendonly", "no"], stdout=subprocess.DEVNULL))
                redis_url = f"redis://127.0.0.1:{port}/0"
                time.sleep(0.3)
            env = {k: v for k, v in os.environ.items() if not k.startswith("FILO_")}
            env.update({"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                        "FILO_PROFILE": "demo", "FILO_REDIS_URL": redis_url, "FILO_IMAGE_SIZE": "224",
                        "FILO_GROUNDING": "false", "FILO_MAX_WAIT_MS": "0", "FILO_MAX_BODY_BYTES": str(64 << 20),
                        "FILO_STREAM": f"filo-bench-{os.getpid()}"})
            wport, aport = _free_port(), _free_port()
            wlog, alog = tmp / "worker.log", tmp / "api.log"
            with open(wlog, "wb") as f:
                worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=repo, stdout=f,
                                          stderr=subprocess.STDOUT,
                                          env={**env, "FILO_WORKER_METRICS_PORT": str(wport),
                                               "FILO_WORKER_METRICS_HOST": "127.0.0.1"})
            procs.append(worker)
            worker_url = f"http://127.0.0.1:{wport}"
            _wait_ready(worker_url, 300, worker, wlog)
            with open(alog, "wb") as f:
                api = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--log-level", "warning"],
                                       cwd=repo, stdout=f, stderr=subprocess.STDOUT,
                                       env={**env, "FILO_PORT": str(aport)})
            procs.append(api)
            api_url = f"http://127.0.0.1:{aport}"
            _wait_ready(api_url, 120, api, alog)
            yield cls(api_url, worker_url, api.pid, procs, tmp)
        finally:
            stop_processes(procs)
            shutil.rmtree(tmp, ignore_errors=True)

    def worker_stage_cpu_s(self) -> dict[str, float]:
        return worker_stage_cpu_s(self.worker_url)


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Terminate what a bench started, last started first; kill what outlives `grace_s`."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                p.kill()


def worker_stage_cpu_s(worker_url: str) -> dict[str, float]:
    """A worker's `filo_worker_cpu_seconds_total{stage}` counters (empty for a worker without them)."""
    text = httpx.get(f"{worker_url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("filo_worker_cpu_seconds_total{"):
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            out[stage] = float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class ServiceRow:
    size: str
    fmt: str
    heatmap: str  # what was asked: "default" or "none"
    megapixels: float
    image_kb: float
    decode_ms: float
    api_cpu_ms: float
    worker_cpu_ms: float | None  # None: the worker does not report its stages
    response_kb: float

    @property
    def api_ratio(self) -> float:
        return self.api_cpu_ms / self.decode_ms

    @property
    def worker_ratio(self) -> float | None:
        return None if self.worker_cpu_ms is None else self.worker_cpu_ms / self.decode_ms


def _idle_rate(pid: int, seconds: float = 2.0) -> float:
    """CPU seconds per wall second the API spends doing nothing (its event loop and watchers)."""
    c0, t0 = process_cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (process_cpu_s(pid) - c0) / (time.monotonic() - t0)


def measure_case(stack: ServiceStack, client: httpx.Client, data: bytes, fmt: str, fields: dict[str, str],
                 n: int, warmup: int, idle_rate: float) -> tuple[float, float | None, float]:
    """(API CPU ms, worker non-model CPU ms, response bytes) per request, over `n` sequential requests."""
    files = {"image": (f"image.{fmt.lower()}", data, f"image/{fmt.lower()}")}
    form = {"category": "bottle", "grounding": "false", **fields}

    def send() -> int:
        r = client.post(f"{stack.api_url}/v1/inspect", data=form, files=files)
        if r.status_code != 200:
            raise RuntimeError(f"inspect answered {r.status_code}: {r.text[:500]}")
        return len(r.content)

    for _ in range(warmup):
        send()
    w0 = stack.worker_stage_cpu_s()
    c0, t0 = process_cpu_s(stack.api_pid), time.monotonic()
    sizes = [send() for _ in range(n)]
    c1, t1 = process_cpu_s(stack.api_pid), time.monotonic()
    w1 = stack.worker_stage_cpu_s()
    api_ms = max(0.0, (c1 - c0) - idle_rate * (t1 - t0)) / n * 1e3
    worker_ms = sum(w1[k] - w0.get(k, 0.0) for k in w1) / n * 1e3 if w1 else None
    return api_ms, worker_ms, float(np.mean(sizes))


def run_service_bench(sizes: list[str], formats: list[str], heatmaps: list[str], n: int = 20, warmup: int = 2,
                      redis_url: str | None = None, repo: Path = REPO, progress: bool = True) -> Iterator[ServiceRow]:
    """One row per (size, format, heatmap) case; `heatmaps` holds "default" and/or "none"."""
    images = {s: photo_like(*IMAGE_SIZES[s], seed=i) for i, s in enumerate(sizes)}
    with ServiceStack.start(redis_url, repo) as stack, httpx.Client(timeout=300) as client:
        idle = _idle_rate(stack.api_pid)
        for size in sizes:
            for fmt in formats:
                data = encode_image(images[size], fmt)
                one_decode = decode_ms(data)
                for heat in heatmaps:
                    fields = {} if heat == "default" else {"heatmap": heat}
                    if progress:
                        print(f"  measuring {size} {fmt} heatmap={heat} ...", file=sys.stderr, flush=True)
                    api_ms, worker_ms, resp = measure_case(stack, client, data, fmt, fields, n, warmup, idle)
                    h, w = IMAGE_SIZES[size]
                    yield ServiceRow(size, fmt, heat, h * w / 1e6, len(data) / 1024, one_decode, api_ms, worker_ms,
                                     resp / 1024)


def format_rows(rows: list[ServiceRow]) -> str:
    lines = ["| image | format | heatmap | image KB | one decode ms | API CPU ms | API / decode | "
             "worker non-model CPU ms | worker / decode | response KB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        wk = "-" if r.worker_cpu_ms is None else f"{r.worker_cpu_ms:.1f}"
        wr = "-" if r.worker_ratio is None else f"{r.worker_ratio:.2f}x"
        lines.append(f"| {r.size} ({r.megapixels:.2f} MP) | {r.fmt} | {r.heatmap} | {r.image_kb:.0f} | "
                     f"{r.decode_ms:.1f} | {r.api_cpu_ms:.1f} | {r.api_ratio:.2f}x | {wk} | {wr} | {r.response_kb:.0f} |")
    return "\n".join(lines)
