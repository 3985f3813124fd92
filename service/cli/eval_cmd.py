"""`filo eval`: benchmark a model on a dataset's test split (the seven metrics of the FiLo paper).

Every image goes through the same inspection engine as the service (Grounding DINO when on, FiLo,
box suppression, score); per category the pixel AUROC / AP / F1-max, AUPRO and image AUROC / AP /
F1-max are computed, then their mean. OUT receives metrics.md / .csv / .json, roc/<category>.png,
examples.png and eval_info.json; the Markdown table is printed on stdout.

A dataset root holding a descriptions.json (what `filo synth` writes) has it loaded automatically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from service.cli.common import add_model_args, dataset_errors, dataset_settings, setup_logging, split_names


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate on a dataset (metrics tables, ROC curves, examples)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="dataset root")
    p.add_argument("--layout", choices=["auto", "mvtec", "visa", "folder"], default="auto")
    p.add_argument("--categories", default=None, help="comma-separated subset of the dataset's categories")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--out", type=Path, default=None, help="report directory (default runs/eval-<time>)")
    p.add_argument("--grounding", choices=["on", "off"], default="on",
                   help="Grounding DINO position and box suppression (on: the paper's protocol)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=None,
                   help="at most N images per category, evenly spaced (all)")
    p.add_argument("--mask-geometry", choices=["crop", "squash"], default="crop",
                   help="crop: the image's resize + center crop (masks line up with maps); squash: resize to "
                        "SxS ignoring aspect, as the released test script did (to compare with published VisA figures)")
    p.add_argument("--mask-interpolation", choices=["bilinear", "nearest"], default="bilinear",
                   help="mask resize before the 0.5 threshold (bilinear, as the released code)")
    p.add_argument("--examples-per-category", type=int, default=2, help="rows of examples.png per category")
    p.add_argument("--save-arrays", action="store_true",
                   help="also write arrays/<category>.npz (maps, masks, labels, scores)")
    p.add_argument("--shots", type=int, default=0, metavar="K",
                   help="k-shot protocol: K normal references drawn from each category's good training images; "
                        "reports zero-shot and K-shot side by side (zero-shot report in OUT/zero-shot)")
    p.add_argument("--shot-seed", type=int, default=0, metavar="S", help="seed of the k-shot draw")
    p.add_argument("-v", "--verbose", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    from filo_lab.evaluation.report import side_by_side
    from filo_lab.evaluation.runner import evaluate_dataset, provenance, provenance_line
    from service.engine.pipeline import InspectionEngine

    settings = dataset_settings(args)
    grounding = settings.grounding
    out = args.out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    if args.shots < 0:
        print("filo eval: --shots must be at least 0", file=sys.stderr)
        return 2
    zero = None
    try:
        engine = InspectionEngine.from_settings(settings)
        common = dict(layout=args.layout, categories=split_names(args.categories), split=args.split,
                      batch_size=args.batch_size, max_images=args.max_images, grounding=grounding,
                      mask_interpolation=args.mask_interpolation, mask_geometry=args.mask_geometry,
                      examples_per_category=args.examples_per_category, save_arrays=args.save_arrays)
        if args.shots:
            zero = evaluate_dataset(engine, args.data, out_dir=out / "zero-shot", **common)
        result = evaluate_dataset(engine, args.data, out_dir=out, shots=args.shots, shot_seed=args.shot_seed,
                                  **common)
    except dataset_errors() as exc:
        print(f"filo eval: {exc}", file=sys.stderr)
        return 2
    print(result.table() if zero is None else side_by_side(zero.per_category, result.per_category, args.shots))
    print(f"model: {provenance_line(provenance(engine, grounding))}", file=sys.stderr)
    n = sum(result.images.values())
    print(f"{n} images, {len(result.per_category)} categories, {result.seconds:.1f}s; report in {out}",
          file=sys.stderr)
    if result.failures:
        print(f"filo eval: {len(result.failures)} image(s) failed and are not in the metrics "
              f"(see {out / 'eval_info.json'})", file=sys.stderr)
        return 1
    return 0

