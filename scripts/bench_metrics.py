"""Time filo_lab.evaluation.metrics.evaluate on a synthetic input as large as VisA's test set.

VisA's test set is 2,162 images; FiLo's maps are 518x518 float32, so the pixel metrics pool 580M
pixels. This script builds smooth random maps with elliptical anomalies of that size (about 2.3 GB of
maps plus 0.6 GB of masks), times `evaluate`, and prints the seconds and the peak memory. It is not a
test (it takes minutes); run it by hand:

    python scripts/bench_metrics.py                 # VisA-sized
    python scripts/bench_metrics.py --images 200    # quicker
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filo_lab.evaluation.metrics import evaluate


def synthetic_input(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Masks (uint8), maps (float32), labels and scores; about half the images are anomalous."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    maps = np.empty((n, size, size), dtype=np.float32)
    labels = (rng.random(n) < 0.55).astype(np.int64)
    for i in range(n):
        coarse = rng.random((37, 37)).astype(np.float32)
        maps[i] = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR) * 0.4 + 0.3
        if labels[i]:
            for _ in range(rng.integers(1, 4)):
                centre = tuple(int(c) for c in rng.integers(40, size - 40, 2))
                axes = tuple(int(a) for a in rng.integers(4, 40, 2))
                cv2.ellipse(masks[i], centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            hot = cv2.GaussianBlur(masks[i].astype(np.float32), (0, 0), 6)
            maps[i] += 0.35 * hot * rng.uniform(0.3, 1.0)
    scores = maps.reshape(n, -1).max(axis=1) + 0.1 * rng.standard_normal(n)
    return masks, maps, labels, scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2162, help="number of maps (VisA test: 2162)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels (FiLo: 518)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--released", action="store_true", help="also time the released AUPRO convention")
    args = parser.parse_args()

    start = time.perf_counter()
    masks, maps, labels, scores = synthetic_input(args.images, args.size, args.seed)
    print(
        f"input: {args.images} maps of {args.size}x{args.size} = {maps.size / 1e6:.0f}M pixels, "
        f"built in {time.perf_counter() - start:.1f} s"
    )
    conventions = ["exact", "released"] if args.released else ["exact"]
    for convention in conventions:
        start = time.perf_counter()
        result = evaluate(masks, maps, labels, scores, aupro_convention=convention)
        seconds = time.perf_counter() - start
        numbers = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        print(f"evaluate ({convention} AUPRO): {seconds:.1f} s  [{numbers}]")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory: {peak_gb:.2f} GB (inputs: {(maps.nbytes + masks.nbytes) / 2**30:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
