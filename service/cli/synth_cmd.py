"""`filo synth OUT`: write the procedural test dataset (MVTec AD layout) of filo_lab.data.synth."""

from __future__ import annotations

import argparse
import sys

from service.cli.common import split_names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="generate a small synthetic dataset with exact masks (MVTec AD layout)",
        description="Generate a seeded, procedural anomaly dataset in the MVTec AD layout, "
        "plus OUT/descriptions.json for its categories. Same arguments, same bytes.",
    )
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.add_argument("--categories", help="comma-separated subset (default: all)")
    parser.add_argument("--n-train", type=int, default=10, help="train/good images per category (10)")
    parser.add_argument("--n-good", type=int, default=8, help="test/good images per category (8)")
    parser.add_argument("--n-defect", type=int, default=4, help="test images per defect kind (4)")
    parser.add_argument("--size", default="256", help="S for S x S images, or WxH (256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing category folders")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from filo_lab.data import synth

    categories = split_names(args.categories)
    try:
        size = synth.parse_size(args.size)
        total = synth.planned_images(categories, args.n_train, args.n_good, args.n_defect)
    except ValueError as exc:
        print(f"filo synth: {exc}", file=sys.stderr)
        return 2
    with tqdm(total=total, unit="img", file=sys.stderr, desc="synth") as bar:
        try:
            summary = synth.generate(
                args.out,
                categories=categories,
                n_train=args.n_train,
                n_good=args.n_good,
                n_defect=args.n_defect,
                size=size,
                seed=args.seed,
                overwrite=args.overwrite,
                on_image=lambda _path: bar.update(1),
            )
        except (ValueError, FileExistsError) as exc:
            bar.close()
            print(f"filo synth: {exc}", file=sys.stderr)
            return 2
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    width, height = summary["size"]
    print(f"wrote {summary['images']} images ({width}x{height}, seed {summary['seed']}) to {summary['root']}")
    for name, counts in summary["categories"].items():
        defects = ", ".join(f"{kind} {n}" for kind, n in counts["test_defects"].items())
        print(f"  {name:8s} train {counts['train']}, test good {counts['test_good']}, {defects}")
    print(f"descriptions: {summary['descriptions']}")
