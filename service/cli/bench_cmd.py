"""`filo bench`: model-only throughput per batch size and precision, and the bf16 map deviation.

`filo bench --service` measures the path around the model instead: CPU per request of the API process
and of the worker's non-model work, and the response size, for photo-like images (service/service_bench.py).
"""

from __future__ import annotations

import argparse
import sys


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
    from service.service_bench import IMAGE_SIZES, format_rows, run_service_bench

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

    from service.bench import bf16_map_deviation, build_random_engine, flops_per_image, run_bench

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    precisions = [x.strip() for x in args.precisions.split(",")]
    groundings = {"on": [True], "off": [False], "both": [False, True]}[args.grounding]
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# filo bench --arch {args.arch} on {name}, random weights, torch {torch.__version__}")
    print("| device | precision | grounding | batch | images/s | ms/batch | per-image vs batch 1 | peak GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    base: dict[tuple, float] = {}
    for row in run_bench(args.arch, args.device, sizes, precisions, groundings, args.iters, args.warmup):
        key = (row.precision, row.grounding)
        base.setdefault(key, row.images_per_s)
        print(f"| {row.device} | {row.precision} | {'on' if row.grounding else 'off'} | {row.batch_size} | "
              f"{row.images_per_s:.2f} | {row.ms_per_batch:.1f} | {row.images_per_s / base[key]:.2f}x | "
              f"{'-' if row.peak_gib is None else f'{row.peak_gib:.1f}'} |", flush=True)
    if args.flops:
        for grounding in groundings:
            parts = flops_per_image(build_random_engine(args.arch, args.device, grounding), grounding)
            print(f"\n| GFLOP per image, grounding {'on' if grounding else 'off'} | GFLOP |\n|---|---:|")
            for part, gflop in parts.items():
                print(f"| {part} | {gflop:.1f} |")
    if "bf16" in precisions:
        dev = bf16_map_deviation(build_random_engine(args.arch, args.device, False))
        print(f"\nlargest |map(bf16) - map(fp32)| = {dev:.2e}")
    sys.stdout.flush()
    return 0
