"""Send images to a running FiLo Inspect service and save what comes back (used by scripts/demo.sh).

The category of `samples/<category>_<anything>.png` is its name up to the first underscore.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

import httpx


def wait_ready(client: httpx.Client, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"service not ready after {timeout_s:.0f}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--api-key", default=None)
    p.add_argument("--grounding", choices=["on", "off"], default="off",
                   help="the demo's Grounding DINO has random weights, so its boxes are noise: off by default")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=120.0, headers=headers) as client:
        wait_ready(client)
        for path in args.images:
            category = path.stem.split("_")[0]
            files = {"image": (path.name, path.read_bytes(), "image/png")}
            data = {"category": category, "grounding": "true" if args.grounding == "on" else "false"}
            r = client.post("/v1/inspect", files=files, data=data)
            if r.status_code != 200:
                print(f"{path}: HTTP {r.status_code} {r.text}", file=sys.stderr)
                return 1
            result = r.json()
            png = base64.b64decode(result.pop("heatmap_png"))
            (args.out / f"{path.stem}_heatmap.png").write_bytes(png)
            (args.out / f"{path.stem}.json").write_text(json.dumps(result, indent=1))
            top = result["top_types"][0]["description"] if result["top_types"] else "-"
            print(f"{path.name:24s} category={category:7s} score={result['score']:.4f} "
                  f"anomalous={result['is_anomalous']} position={result['position']} top_type={top!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
