"""`filo calibrate`: per-category decision thresholds (F1-max) from a labelled folder.

Every image of the chosen split goes through the inspection engine (as `filo eval` does); per
category the cut `score >= threshold` with the highest F1 between its good and defective images is
chosen (what APRIL-GAN's authors recommend for a deployed detector), by the labelled rule the service's
`POST /v1/categories/{name}/calibrate` uses too (`service.catalog.thresholds`). With `--shots K` the scores are
those of K-shot inspection (K normal references drawn from the category's good training images), so
the thresholds fit a service whose categories hold references. OUT (JSON) holds the thresholds in
`thresholds`, ready for FILO_THRESHOLDS, and per category the scores they were chosen from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from service.cli.common import (
    add_model_args,
    announce_profile,
    dataset_errors,
    settings_from_args,
    setup_logging,
    split_names,
    with_dataset_descriptions,
)

if TYPE_CHECKING:
    from service.catalog.thresholds import LabelledScores


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
    from filo_lab.data import group_by_category, read_dataset
    from filo_lab.evaluation.runner import catalog_name, draw_shots, using_references
    from service.catalog.thresholds import NotEnoughLabelled
    from service.engine.pipeline import InspectionEngine

    grounding = args.grounding == "on"
    settings = with_dataset_descriptions(settings_from_args(args, grounding=grounding), args.data)
    announce_profile(settings)
    categories = split_names(args.categories)
    try:
        engine = InspectionEngine.from_settings(settings)
        groups = group_by_category(read_dataset(args.data, args.layout, categories, args.split))
        names = {cat: catalog_name(engine.catalog, cat) for cat in groups}
        shots = {cat: draw_shots(args.data, args.layout, cat, args.shots, args.shot_seed) for cat in groups} \
            if args.shots else {}
    except dataset_errors() as exc:
        print(f"filo calibrate: {exc}", file=sys.stderr)
        return 2
    report: dict[str, dict] = {}
    failures = 0
    with tqdm(total=sum(len(g) for g in groups.values()), desc="calibrate", unit="img", file=sys.stderr) as bar:
        for cat, group in groups.items():
            with using_references(engine, names[cat], shots.get(cat)):
                gathered, failed = _scores(engine, names[cat], group, args.batch_size, grounding, bar)
            failures += failed
            try:
                cal = gathered.threshold()  # the service's labelled rule (service/catalog/thresholds.py)
            except NotEnoughLabelled as exc:
                print(f"filo calibrate: {cat}: needs good and defective images "
                      f"({exc.n_good} and {exc.n_defective})", file=sys.stderr)
                failures += 1
                continue
            report[names[cat]] = {"threshold": cal.threshold, "f1": cal.f1, "n_good": cal.n_good,
                                  "n_defective": cal.n_defective, "shots": args.shots, "scores": cal.scores()}
    _write_report(report, engine.model_info(), args.shots, args.out)
    return 1 if failures else 0


def _scores(engine, name: str, group: list, batch_size: int, grounding: bool, bar) -> tuple[LabelledScores, int]:
    """The labelled scores of one category's images (the lab's one batched loop), and how many failed."""
    from filo_lab.evaluation.runner import inspect_samples
    from service.catalog.thresholds import LabelledScores
    from service.core.types import InspectError

    gathered = LabelledScores()
    failed = 0
    for _, sample, _, _, res in inspect_samples(engine, name, group, batch_size, grounding):
        bar.update(1)
        if isinstance(res, InspectError):
            failed += 1
            print(f"filo calibrate: {sample.image_path}: {res.message}", file=sys.stderr)
            continue
        gathered.add(float(res.score), sample.label == 1)
    return gathered, failed


def _write_report(report: dict[str, dict], model: dict, shots: int, out: Path | None) -> None:
    """The table on stdout; with `out`, the thresholds JSON (and the FILO_THRESHOLDS line that uses it)."""
    print("| category | threshold | F1 | good | defective |\n|---|---:|---:|---:|---:|")
    for name, e in report.items():
        print(f"| {name} | {e['threshold']:.4f} | {100 * e['f1']:.1f} | {e['n_good']} | {e['n_defective']} |")
    doc = {"model": model, "shots": shots, "categories": report,
           "thresholds": {name: e["threshold"] for name, e in report.items()}}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"thresholds written to {out} (FILO_THRESHOLDS='{json.dumps(doc['thresholds'])}')", file=sys.stderr)
