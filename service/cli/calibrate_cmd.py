"""`filo calibrate`: per-category decision thresholds (F1-max) from a labelled folder.

Every image of the chosen split goes through the inspection engine (as `filo eval` does); per
category the cut `score >= threshold` with the highest F1 between its good and defective images is
chosen (what APRIL-GAN's authors recommend for a deployed detector), by the labelled rule the service's
`POST /v1/categories/{name}/calibrate` uses too (`service.catalog.thresholds`). With `--shots K` the scores are
those of K-shot inspection (K normal references drawn from the category's good training images), so
the thresholds fit a service whose categories hold references. OUT (JSON) holds the thresholds in
`thresholds`, ready for FILO_THRESHOLDS, and per category the scores they were chosen from.
The work is the lab's (`filo_lab.evaluation.calibration`); this command parses and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.cli.common import add_model_args, dataset_errors, dataset_settings, setup_logging, split_names


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="per-category F1-max thresholds from a labelled folder",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="dataset root (MVTec AD / VisA / folder layout)")
    p.add_argument("--layout", choices=["auto", "mvtec", "visa", "folder"], default="auto")
    p.add_argument("--categories", default=None, help="comma-separated subset")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--grounding", choices=["on", "off"], default="on")
    p.add_argument("--shots", type=int, default=0, metavar="K", help="score with K normal references per category")
    p.add_argument("--shot-seed", type=int, default=0, metavar="S")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="write the thresholds JSON here")
    p.add_argument("-v", "--verbose", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    from filo_lab.evaluation.calibration import calibrate_dataset
    from service.engine.pipeline import InspectionEngine

    settings = dataset_settings(args)
    try:
        engine = InspectionEngine.from_settings(settings)
        result = calibrate_dataset(engine, args.data, layout=args.layout, categories=split_names(args.categories),
                                   split=args.split, batch_size=args.batch_size, grounding=settings.grounding,
                                   shots=args.shots, shot_seed=args.shot_seed)
    except dataset_errors() as exc:
        print(f"filo calibrate: {exc}", file=sys.stderr)
        return 2
    for path, message in result.failures:
        print(f"filo calibrate: {path}: {message}", file=sys.stderr)
    for cat, (n_good, n_defective) in result.too_few.items():
        print(f"filo calibrate: {cat}: needs good and defective images ({n_good} and {n_defective})",
              file=sys.stderr)
    print(result.table())
    if args.out:
        result.write(args.out)
        print(f"thresholds written to {args.out} (FILO_THRESHOLDS='{json.dumps(result.thresholds())}')",
              file=sys.stderr)
    return 0 if result.complete else 1
