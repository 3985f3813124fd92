"""What a learn does to the other categories' inspections: their latency while one category learns.

It starts `filo serve --embedded --profile demo` from the repository `--repo` names (so the same client can
measure an older checkout too), makes the learned category's records (`--reviewed` inspections, every one NG
under a manual threshold of 0 and judged good, so each becomes a reference and learning rebuilds the category's
reference memory and scores every kept image again), then sends inspections of another category from
`--clients` clients, first for `--seconds` alone (the baseline), then while the learn runs, and prints p50 and
p99 of both and how long the learn took. A learn answered 200 (it ran on the request) and one answered 202 (a
background job, followed to its end) are both waited for. Loopback only; bounded by `--seconds` and the learn.

    python -m filo_lab.bench.learn_stall --repo . --reviewed 20
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ADMIN = {"Authorization": "Bearer admin-bench"}
LEARNED, OTHER = "bottle", "candle"


def _png(seed: int, h: int = 240, w: int = 320) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).resize((w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(repo: Path, state: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILO_")}
    env.update({"PYTHONPATH": str(repo), "FILO_PROFILE": "demo", "FILO_IMAGE_SIZE": "224", "FILO_GROUNDING": "false",
                "FILO_STATE_DIR": str(state), "FILO_ADMIN_KEY": "admin-bench", "FILO_RECORDS_KEEP": "all",
                "FILO_REFERENCE_MAX_IMAGES": "64", "FILO_REQUEST_TIMEOUT_S": "120", "OMP_NUM_THREADS": "1"})
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--embedded", "--port", str(port),
                             "--host", "127.0.0.1", "--log-level", "warning"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not get ready")


def _inspect(client: httpx.Client, category: str, seed: int) -> str:
    r = client.post("/v1/inspect", data={"category": category, "heatmap": "none"},
                    files={"image": ("x.png", _png(seed), "image/png")})
    r.raise_for_status()
    return r.json()["request_id"]


def _prepare(client: httpx.Client, reviewed: int) -> None:
    client.put(f"/v1/categories/{LEARNED}/threshold", json={"threshold": 0.0}, headers=ADMIN).raise_for_status()
    ids = [_inspect(client, LEARNED, 1000 + i) for i in range(reviewed)]
    end = time.monotonic() + 120
    while any(client.get(f"/v1/inspections/{i}").status_code != 200 for i in ids):
        if time.monotonic() > end:
            raise TimeoutError("records not written")
        time.sleep(0.2)
    for i, rid in enumerate(ids):  # most judged good (they become references), a few defects
        label = "defect" if i % 5 == 4 else "good"
        client.post(f"/v1/inspections/{rid}/review", json={"label": label}, headers=ADMIN).raise_for_status()


def _load(url: str, clients: int, stop: threading.Event, out: list[float]) -> None:
    def one(k: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            seed = 10_000 * (k + 1)
            while not stop.is_set():
                t0 = time.perf_counter()
                _inspect(c, OTHER, seed)
                out.append((time.perf_counter() - t0) * 1e3)
                seed += 1

    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _learn(client: httpx.Client) -> float:
    t0 = time.perf_counter()
    r = client.post(f"/v1/categories/{LEARNED}/learn", headers=ADMIN, timeout=900)
    r.raise_for_status()
    if r.status_code == 202:  # a background job: followed to its end
        job = r.json()["id"]
        while client.get(f"/v1/jobs/{job}", headers=ADMIN).json()["state"] == "running":
            time.sleep(0.2)
    return time.perf_counter() - t0


def run(repo: Path, reviewed: int, clients: int, seconds: float) -> dict[str, float]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="filo-learn-stall-") as state:
        proc = _start(repo, Path(state), port)
        try:
            _wait_ready(url, proc)
            with httpx.Client(base_url=url, timeout=300) as client:
                _prepare(client, reviewed)
                alone: list[float] = []
                stop = threading.Event()
                load = threading.Thread(target=_load, args=(url, clients, stop, alone))
                load.start()
                time.sleep(seconds)
                stop.set()
                load.join()
                during: list[float] = []
                stop = threading.Event()
                load = threading.Thread(target=_load, args=(url, clients, stop, during))
                load.start()
                learn_s = _learn(client)
                stop.set()
                load.join()
        finally:
            proc.terminate()
            proc.wait(30)
    return {"alone_p50": _pct(alone, 50), "alone_p99": _pct(alone, 99), "during_p50": _pct(during, 50),
            "during_p99": _pct(during, 99), "during_max": max(during) if during else float("nan"),
            "learn_s": learn_s, "n_alone": len(alone), "n_during": len(during)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    p.add_argument("--reviewed", type=int, default=20)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    r = run(args.repo.resolve(), args.reviewed, args.clients, args.seconds)
    print(f"| {args.repo} | {args.reviewed} | {r['alone_p50']:.0f} / {r['alone_p99']:.0f} ({r['n_alone']}) | "
          f"{r['during_p50']:.0f} / {r['during_p99']:.0f} ({r['n_during']}) | {r['during_max']:.0f} | "
          f"{r['learn_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
