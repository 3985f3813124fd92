"""The decisive table: FiLo alone, Grounding DINO alone and both, at one batch size and precision, for each
implementation of Grounding DINO's deformable attention, on the realistic stand-in; then the profile of one
batch with Grounding DINO on. `scripts/gpu_check.sh` runs it right after the CUDA tests.

"Grounding DINO alone" is the detector as the engine calls it (`GroundingDetector.detect` on prepared pixels,
one caption, bf16 autocast as the engine sets it): its forward and the host post-processing of the boxes it
keeps. "FiLo alone" and "both" are the engine's batches (`time_batches`). Every row says which deformable
attention actually ran (read from the layers), and an implementation that cannot run is a row with its error,
never a quiet substitute.

    python -m filo_lab.bench.parts --arch real --device cuda --batch 32 --precision bf16 \
        --implementations triton,pytorch --json parts.json --profile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch

from descriptions import CategoryCatalog
from filo_lab.bench.model import _images, _sync, build_random_engine, profile_batch, time_batches
from service.engine.pipeline import InspectionEngine

PARTS = ("FiLo alone", "Grounding DINO alone", "FiLo + Grounding DINO")


@dataclass
class PartRow:
    part: str
    deformable_attention: str  # what ran ("-": no Grounding DINO in this part)
    batch_size: int
    precision: str
    images_per_s: float | None
    ms_per_batch: float | None
    peak_gib: float | None = None
    boxes_per_image: float | None = None  # Grounding DINO alone: detections kept per image
    error: str | None = None


def time_detector(detector, batch_size: int, iters: int, warmup: int, precision: str,
                  category: str = "pcb1") -> tuple[float, float, float | None, float]:
    """(images/s, ms per batch, peak CUDA GiB or None, detections kept per image) of the detector alone, as the
    engine calls it: prepared pixels, the category's caption, bf16 autocast when `precision` is bf16."""
    images = _images(batch_size)
    descriptions = [list(CategoryCatalog.load().get(category).descriptions)] * batch_size
    pixels = [detector.preprocess(image) for image in images]
    device = str(detector.device)
    cuda = device.startswith("cuda")

    def once():
        with torch.no_grad(), torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16,
                                             enabled=precision == "bf16"):
            return detector.detect(images, descriptions, pixels)

    for _ in range(warmup):
        once()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        found = once()
    _sync(device)
    dt = (time.perf_counter() - t0) / max(1, iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return batch_size / dt, dt * 1e3, peak, sum(len(d) for d in found) / batch_size


def run_parts(arch: str, device: str, batch_size: int, precision: str, implementations: list[str], iters: int,
              warmup: int, grounding_weights: str = "realistic", frame: int | None = None):
    """Rows of the table, FiLo alone first, then per implementation Grounding DINO alone and both; and the
    engine (with Grounding DINO, the first implementation that ran) for the profile."""
    both = build_random_engine(arch, device, True, grounding_weights=grounding_weights).with_options(
        precision=precision, max_batch_size=batch_size)
    # the same FiLo weights without a detector
    filo = InspectionEngine(both.model, both.info, both.catalog, both.device, None, False, both.options)
    ips, ms, peak = time_batches(filo, batch_size, iters, warmup)
    yield PartRow(PARTS[0], "-", batch_size, precision, ips, ms, peak), None
    detector = both.detector
    if frame:  # a smaller Grounding DINO input (the CPU dry run); the service's is 518
        from models.grounding.detector import make_image_processor

        detector.image_processor = make_image_processor(shortest_edge=frame)
    profiled = None
    for choice in implementations:
        try:
            ran = detector.use_deformable_attention(choice) or "none"
        except Exception as exc:  # recorded as its rows: this implementation cannot run here
            for part in PARTS[1:]:
                yield PartRow(part, choice, batch_size, precision, None, None,
                              error=f"{type(exc).__name__}: {exc}"), None
            continue
        for part in PARTS[1:]:
            try:
                if part == PARTS[1]:
                    ips, ms, peak, boxes = time_detector(detector, batch_size, iters, warmup, precision)
                else:
                    (ips, ms, peak), boxes = time_batches(both, batch_size, iters, warmup), None
                yield PartRow(part, ran, batch_size, precision, ips, ms, peak, boxes), None
            except Exception as exc:  # one failing row (memory, a kernel) leaves the others
                yield PartRow(part, ran, batch_size, precision, None, None,
                              error=f"{type(exc).__name__}: {exc}"[:2000]), None
        if profiled is None:
            profiled = choice
    if profiled is not None:
        detector.use_deformable_attention(profiled)
        yield None, both


def table_md(rows: list[dict]) -> str:
    lines = ["| part | deformable attention | batch | precision | images/s | ms/batch | peak GiB | boxes/image |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['part']} | {r['deformable_attention']} | {r['batch_size']} | {r['precision']} | "
                         f"failed: {r['error'][:120]} | | | |")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        boxes = "-" if r["boxes_per_image"] is None else f"{r['boxes_per_image']:.1f}"
        lines.append(f"| {r['part']} | {r['deformable_attention']} | {r['batch_size']} | {r['precision']} | "
                     f"{r['images_per_s']:.1f} | {r['ms_per_batch']:.1f} | {peak} | {boxes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["real", "tiny"], default="real")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--implementations", default="triton,pytorch",
                    help="deformable attention implementations, in order (triton, hub, pytorch)")
    ap.add_argument("--grounding-weights", choices=["realistic", "worst-case"], default="realistic")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--frame", type=int, help="Grounding DINO's input shorter side (default: the service's 518)")
    ap.add_argument("--profile", action="store_true", help="then profile one batch with Grounding DINO on")
    ap.add_argument("--json", metavar="FILE", help="write the rows (and the profile) as JSON after every row")
    args = ap.parse_args(argv)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    report: dict = {"device_name": name, "arch": args.arch, "grounding_weights": args.grounding_weights, "rows": []}

    def write() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    print(f"# the decisive table: {args.arch} on {name}, {args.precision}, batch {args.batch}, "
          f"{args.grounding_weights} Grounding DINO stand-in", flush=True)
    engine = None
    for row, with_grounding in run_parts(args.arch, args.device, args.batch, args.precision,
                                         [x.strip() for x in args.implementations.split(",") if x.strip()],
                                         args.iters, args.warmup, args.grounding_weights, args.frame):
        if row is None:
            engine = with_grounding
            continue
        report["rows"].append(asdict(row))
        print(table_md([asdict(row)]).splitlines()[-1], flush=True)
        write()
    if args.profile and engine is not None:
        prof = profile_batch(engine, args.batch)
        prof["runtime"] = engine.runtime()
        report["profile"] = prof
        write()
        print(f"\n# one batch of {args.batch} with Grounding DINO on ({prof['runtime']['deformable_attention']}): "
              f"{prof['wall_ms']:.1f} ms wall", flush=True)
    write()
    return 1 if any(r["error"] for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
