"""Send images to a running FiLo Inspect service and save what comes back (used by scripts/demo.sh).

The category of `samples/<category>_<anything>.png` is its name up to the first underscore.

With `--synth-root DIR` (a `filo synth` folder made with the samples' own seed and size, as
scripts/demo.sh does), each category first gets its normal references (DIR/<category>/train/good) and
a threshold calibrated on labelled images (DIR/<category>/test: good and defective, every index but
000, which is the bundled sample itself), so the verdicts are per-category calibrated ones.
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
    p.add_argument("--synth-root", type=Path, default=None,
                   help="register references and calibrate each category from this filo synth folder first")
    p.add_argument("--grounding", choices=["on", "off"], default="off",
                   help="the demo's Grounding DINO has random weights, so its boxes are noise: off by default")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=120.0, headers=headers) as client:
        wait_ready(client)
        if args.synth_root:
            for category in sorted({path.stem.split("_")[0] for path in args.images}):
                if not prepare_category(client, args.synth_root, category):
                    return 1
        for path in args.images:
            category = path.stem.split("_")[0]
            files = {"image": (path.name, path.read_bytes(), "image/png")}
            data = {"category": category, "grounding": "true" if args.grounding == "on" else "false",
                    "heatmap": "png", "heatmap_size": "original"}  # a PNG overlay at full size, as written below
            r = client.post("/v1/inspect", files=files, data=data)
            if r.status_code != 200:
                print(f"{path}: HTTP {r.status_code} {r.text}", file=sys.stderr)
                return 1
            result = r.json()
            png = base64.b64decode(result.pop("heatmap_png"))
            (args.out / f"{path.stem}_heatmap.png").write_bytes(png)
            (args.out / f"{path.stem}.json").write_text(json.dumps(result, indent=1))
            top = result["top_types"][0]["description"] if result["top_types"] else "-"
            verdict = "NG" if result["is_anomalous"] else "OK"
            print(f"{path.name:24s} category={category:7s} score={result['score']:.4f} {verdict} "
                  f"(threshold {result['threshold']:.4f} {result.get('threshold_source', 'default')}, "
                  f"{result.get('references', 0)} references) position={result['position']} top_type={top!r}")
    return 0


def _files(field: str, paths: list[Path]) -> list:
    return [(field, (p.name, p.read_bytes(), "image/png")) for p in paths]


def prepare_category(client: httpx.Client, root: Path, category: str) -> bool:
    """PUT the category's normal references, then calibrate its threshold on held-out labelled images."""
    refs = sorted((root / category / "train" / "good").glob("*.png"))
    test = root / category / "test"
    good = sorted(p for p in (test / "good").glob("*.png") if p.stem != "000")
    defective = sorted(p for d in sorted(test.iterdir()) if d.is_dir() and d.name != "good"
                       for p in d.glob("*.png") if p.stem != "000")
    r = client.put(f"/v1/categories/{category}/references", files=_files("images", refs))
    if r.status_code != 200:
        print(f"{category}: references: HTTP {r.status_code} {r.text}", file=sys.stderr)
        return False
    body = r.json()
    r = client.post(f"/v1/categories/{category}/calibrate", files=_files("good", good) + _files("defective", defective))
    if r.status_code != 200:
        print(f"{category}: calibrate: HTTP {r.status_code} {r.text}", file=sys.stderr)
        return False
    cal = r.json()
    print(f"{category:7s} references={body['references']} memory={body['memory_bytes'] / 2**20:.1f} MiB "
          f"threshold={cal['threshold']:.4f} ({cal['threshold_source']}: {cal['n_good']} good, "
          f"{cal['n_defective']} defective, F1 {cal.get('f1', float('nan')):.2f})")
    return True


if __name__ == "__main__":
    sys.exit(main())
