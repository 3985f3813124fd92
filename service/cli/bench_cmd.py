"""`filo bench`: model-only throughput per batch size and precision, and the bf16 map deviation.

`filo bench --service` measures the path around the model instead: CPU per request of the API process
and of the worker's non-model work, and the response size, for photo-like images (filo_lab/bench/stack.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="model-only throughput (random weights)", description=__doc__)
    p.add_argument("--arch", choices=["tiny", "real"], default="tiny",
                   help="real = ViT-L-14-336 (GELU, the default backbone) at 518 + Grounding DINO tiny (random weights)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--grounding", choices=["on", "off", "both"], default="both")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (FILO_COMPILE)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="compile the encoder with CUDA graphs on bucketed batch sizes (FILO_CUDA_GRAPHS)")
    p.add_argument("--grounding-text-cache", action="store_true",
                   help="keep Grounding DINO's text pass per caption (FILO_GROUNDING_TEXT_CACHE)")
    p.add_argument("--grounding-weights", choices=["realistic", "worst-case"], default="realistic",
                   help="Grounding DINO's stand-in: realistic (a handful of boxes per image, as trained weights) or "
                   "worst-case (random initialisation: most of its 900 queries boxed)")
    p.add_argument("--deformable-attention", choices=["auto", "triton", "hub", "pytorch"], default="auto",
                   help="Grounding DINO's deformable attention (FILO_GROUNDING_DEFORMABLE_ATTENTION)")
    p.add_argument("--compile-grounding", action="store_true",
                   help="torch.compile Grounding DINO as a whole (FILO_COMPILE_GROUNDING)")
    p.add_argument("--no-pin-memory", action="store_true",
                   help="plain blocking copies of the pixels instead of pinned, non-blocking ones")
    p.add_argument("--json", metavar="FILE", help="also write the rows (and FLOP parts, bf16 deviation) as JSON")
    p.add_argument("--profile-batch", type=int, metavar="N",
                   help="also profile one batch of N (last precision and grounding setting): top operators by time")
    p.add_argument("--flops", action="store_true",
                   help="also print GFLOP per image by part (PyTorch's FLOP counter), to judge GPU efficiency")
    s = p.add_argument_group("--service: the service path (a local redis-server, one demo worker, one API)")
    s.add_argument("--service", action="store_true",
                   help="CPU ms per request of the API and of the worker's non-model work, and response sizes")
    s.add_argument("--sizes", default="1MP,1.5MP,5MP", help="image sizes: 1MP, 1.5MP, 5MP")
    s.add_argument("--formats", default="JPEG,PNG", help="upload formats: JPEG, PNG")
    s.add_argument("--heatmaps", default="default,none",
                   help="'default' (no heatmap parameter: the server's default) and/or any heatmap value")
    s.add_argument("--requests", type=int, default=20, help="requests per case (after 2 warm-up requests)")
    s.add_argument("--redis-url", help="use this Redis instead of starting a redis-server")
    p.set_defaults(func=run)


def run_service(args: argparse.Namespace) -> int:
    from filo_lab.bench.stack import IMAGE_SIZES, format_rows, run_service_bench

    sizes = [x.strip() for x in args.sizes.split(",")]
    unknown = [x for x in sizes if x not in IMAGE_SIZES]
    if unknown:
        print(f"filo bench --service: unknown sizes {unknown}; known: {', '.join(IMAGE_SIZES)}", file=sys.stderr)
        return 2
    formats = [x.strip().upper() for x in args.formats.split(",")]
    heatmaps = [x.strip() for x in args.heatmaps.split(",")]
    rows = []
    print(f"# filo bench --service: {args.requests} sequential requests per case, one demo worker, one API",
          file=sys.stderr)
    for row in run_service_bench(sizes, formats, heatmaps, n=args.requests, redis_url=args.redis_url):
        rows.append(row)
    print(format_rows(rows))
    sys.stdout.flush()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.service:
        return run_service(args)
    import torch

    from filo_lab.bench.model import bf16_map_deviation, build_random_engine, flops_per_image, run_bench
    from service.engine.pipeline import GROUNDING_TEXT_CACHE_CAPTIONS

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    precisions = [x.strip() for x in args.precisions.split(",")]
    groundings = {"on": [True], "off": [False], "both": [False, True]}[args.grounding]
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# filo bench --arch {args.arch} on {name}, random weights, torch {torch.__version__}; "
          f"encoder compiled: {'yes' if args.compile else 'no'}; CUDA graphs: {'yes' if args.cuda_graphs else 'no'}; "
          f"text cache: {'yes' if args.grounding_text_cache else 'no'}; pinned copies: {'no' if args.no_pin_memory else 'yes'}; "
          f"Grounding DINO stand-in: {args.grounding_weights}, compiled: {'yes' if args.compile_grounding else 'no'}, "
          f"deformable attention asked: {args.deformable_attention}")
    print("| device | precision | grounding | batch | images/s | ms/batch | per-image vs batch 1 | peak GiB | "
          "deformable attention |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    base: dict[tuple, float] = {}
    report: dict = {"device_name": name, "torch": torch.__version__, "arch": args.arch, "rows": []}
    for row in run_bench(args.arch, args.device, sizes, precisions, groundings, args.iters, args.warmup,
                         compile=args.compile, pin_memory=not args.no_pin_memory, cuda_graphs=args.cuda_graphs,
                         text_cache=GROUNDING_TEXT_CACHE_CAPTIONS if args.grounding_text_cache else 0,
                         grounding_weights=args.grounding_weights, deformable_attention=args.deformable_attention,
                         compile_grounding=args.compile_grounding):
        report["rows"].append(asdict(row))
        _write_json(args.json, report)
        key = (row.precision, row.grounding)
        base.setdefault(key, row.images_per_s)
        print(f"| {row.device} | {row.precision} | {'on' if row.grounding else 'off'} | {row.batch_size} | "
              f"{row.images_per_s:.2f} | {row.ms_per_batch:.1f} | {row.images_per_s / base[key]:.2f}x | "
              f"{'-' if row.peak_gib is None else f'{row.peak_gib:.1f}'} | {row.deformable_attention} |", flush=True)
    if args.profile_batch:
        report["profile"] = _profile(args, precisions[-1], groundings[-1])
    if args.flops:
        for grounding in groundings:
            parts = flops_per_image(build_random_engine(args.arch, args.device, grounding), grounding)
            report.setdefault("gflop", {})["on" if grounding else "off"] = parts
            print(f"\n| GFLOP per image, grounding {'on' if grounding else 'off'} | GFLOP |\n|---|---:|")
            for part, gflop in parts.items():
                print(f"| {part} | {gflop:.1f} |")
    if "bf16" in precisions:
        dev = bf16_map_deviation(build_random_engine(args.arch, args.device, False))
        report["bf16_map_deviation"] = dev
        print(f"\nlargest |map(bf16) - map(fp32)| = {dev:.2e}")
    _write_json(args.json, report)
    sys.stdout.flush()
    return 0


def _profile(args: argparse.Namespace, precision: str, grounding: bool) -> dict:
    """One profiled batch of ``--profile-batch`` with the run's last precision and grounding, printed as the
    top operators by self time: where the time goes when a target is missed."""
    from filo_lab.bench.model import build_random_engine, profile_batch

    engine = build_random_engine(args.arch, args.device, grounding, grounding_weights=args.grounding_weights,
                                 deformable_attention=args.deformable_attention).with_options(
        precision=precision, pin_memory=not args.no_pin_memory, compile=args.compile, cuda_graphs=args.cuda_graphs,
        max_batch_size=args.profile_batch, compile_grounding=args.compile_grounding and grounding)
    if args.cuda_graphs:
        engine.warmup()
    prof = profile_batch(engine, args.profile_batch)
    prof["runtime"] = engine.runtime()
    busy = "" if prof["device_busy_ms"] is None else f", device kernels {prof['device_busy_ms']:.1f} ms"
    print(f"\n# one batch of {args.profile_batch}, {precision}, grounding {'on' if grounding else 'off'}: "
          f"{prof['wall_ms']:.1f} ms wall{busy}\n| operator | calls | self ms |\n|---|---:|---:|")
    for op in prof["top"]:
        print(f"| {op['name'][:80]} | {op['calls']} | {op['self_ms']:.2f} |")
    return prof


def _write_json(path: str | None, report: dict) -> None:
    """Rewritten after every row, so a run cut short by its time limit still leaves what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
