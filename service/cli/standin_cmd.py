"""`filo standin OUT`: write deterministic stand-in weights of the real shapes (models/standin.py).

For measuring and testing the production path where real weights cannot be fetched: serve them with
`--profile production --clip-weights OUT/clip-standin.safetensors --checkpoint OUT/filo-standin.pth
--grounding-model OUT/grounding-dino-standin`. The files say they are stand-ins, and the service reports it.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("standin", help="write stand-in weights of the real shapes (never real results)",
                              description=__doc__)
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="clip,filo,grounding", help="any of clip, filo, grounding")
    p.add_argument("--arch", choices=["real", "tiny"], default="real",
                   help="real = ViT-L-14-336 + grounding-dino-tiny shapes; tiny = the repository's test models")
    p.add_argument("--grounding", choices=["realistic", "worst-case"], default="realistic",
                   help="Grounding DINO's kind: realistic (a handful of boxes on any image, as trained weights) or "
                   "worst-case (the random initialisation: most of its 900 queries boxed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from filo_lab.standin import production_env, write_standin_weights

    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    unknown = sorted(set(parts) - {"clip", "filo", "grounding"})
    if unknown:
        print(f"filo standin: unknown parts {unknown}; known: clip, filo, grounding", file=sys.stderr)
        return 2
    paths = write_standin_weights(args.out, args.seed, parts, args.arch, args.grounding)
    for name, value in production_env(paths, args.arch).items():
        print(f"{name}={value}")
    return 0
