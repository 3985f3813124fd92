"""`filo inspect`: run FiLo on image files and write maps, heatmaps and JSON results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.cli.common import MODEL_ERRORS, add_model_args, announce_profile, settings_from_args, setup_logging
from service.core.imaging import ImageDecodeError, heatmap_png, read_image_file
from service.core.types import InspectError, InspectRequest, InspectResult


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="inspect image files", description=__doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--category", required=True, help="category name (see descriptions/*.json)")
    p.add_argument("--grounding", choices=["on", "off"], default="on")
    p.add_argument("--position", default=None, help='force the position, e.g. "top left"')
    p.add_argument("--boxes", action="append", default=None, metavar="x1,y1,x2,y2",
                   help="box in the model frame's pixels (x1 <= x < x2); repeatable; replaces detection")
    p.add_argument("--references", nargs="+", default=None, metavar="PATH",
                   help="normal reference images (files or folders of them) of the category, used for this run")
    p.add_argument("--out", type=Path, default=None, help="write <stem>.npy and <stem>.png here")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("-v", "--verbose", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r} must be x1,y1,x2,y2")
    x1, y1, x2, y2 = (float(v) for v in parts)
    if x2 <= x1 or y2 <= y1:
        raise argparse.ArgumentTypeError(f"box {text!r} must have x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def _output_stems(paths: list[str]) -> list[str]:
    """File stems, made unique when two inputs share one (a/x.png and b/x.png)."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    try:
        boxes = [parse_box(b) for b in args.boxes] if args.boxes else None
    except argparse.ArgumentTypeError as exc:
        print(f"filo inspect: {exc}", file=sys.stderr)
        return 2
    grounding = args.grounding == "on" and boxes is None
    settings = settings_from_args(args, grounding=grounding)
    announce_profile(settings)

    from service.engine.pipeline import InspectionEngine

    try:
        engine = InspectionEngine.from_settings(settings)
        engine.prepare_category(args.category)
    except MODEL_ERRORS as exc:
        print(f"filo inspect: {exc}", file=sys.stderr)
        return 2
    if args.references:
        code = _install_references(engine, args.category, args.references)
        if code:
            return code
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    stems = _output_stems(args.images)
    todo = list(zip(args.images, stems))
    with tqdm(total=len(todo), desc="inspect", unit="img", file=sys.stderr) as bar:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            reqs, names = [], []
            for path, stem in chunk:
                try:
                    image = read_image_file(path)
                except (OSError, ImageDecodeError) as exc:
                    failures += 1
                    _report_error(args, path, getattr(exc, "code", "unreadable"), str(exc))
                    continue
                reqs.append(InspectRequest(image=image, category=args.category, top_k=args.top_k,
                                           grounding=grounding, position=args.position, boxes_frame=boxes))
                names.append((path, stem))
            for (path, stem), req, res in zip(names, reqs, engine.inspect_batch(reqs)):
                if isinstance(res, InspectError):
                    failures += 1
                    _report_error(args, path, res.code, res.message)
                else:
                    _emit(args, path, stem, req, res, engine.image_size)
            bar.update(len(chunk))
    return 1 if failures else 0


def _emit(args, path: str, stem: str, req: InspectRequest, res: InspectResult, size: int) -> None:
    map_path = png_path = None
    if args.out:
        map_path = args.out / f"{stem}.npy"
        png_path = args.out / f"{stem}.png"
        np.save(map_path, res.anomaly_map.astype(np.float32))
        valid = [(b.x1, b.y1, b.x2, b.y2) for b in res.boxes if b.valid]
        png_path.write_bytes(heatmap_png(req.image, res.anomaly_map, size, boxes=valid))
    record = {
        "image": path,
        "score": res.score,
        "position": res.position,
        "boxes": [{"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2, "phrase": b.phrase,
                   "confidence": b.confidence, "valid": b.valid} for b in res.boxes],
        "top_types": [{"description": t.description, "similarity": t.similarity} for t in res.top_types],
        "map": str(map_path) if map_path else None,
        "heatmap": str(png_path) if png_path else None,
    }
    if args.references:  # zero-shot output stays exactly what it always was
        record["references"] = res.references
    if args.json:
        print(json.dumps(record), flush=True)
    else:
        print(f"{path}: score {res.score:.4f} position {res.position or 'all'}"
              + (f" -> {png_path}" if png_path else ""), file=sys.stderr)


def _install_references(engine, category: str, paths: list[str]) -> int:
    """Build the category's reference memory from files and folders; 0, or 2 after an error message."""
    from service.catalog.references import read_reference_files

    try:
        refs = read_reference_files(paths, engine.references.max_image_pixels)
    except (OSError, ImageDecodeError) as exc:
        print(f"filo inspect: reference image: {exc}", file=sys.stderr)
        return 2
    if not len(refs):
        print(f"filo inspect: no reference images in {' '.join(paths)}", file=sys.stderr)
        return 2
    engine.references.set(category, refs)
    print(f"references: {len(refs)} image(s), memory {engine.references.memory_bytes(category)} bytes",
          file=sys.stderr)
    return 0


def _report_error(args, path: str, code: str, message: str) -> None:
    if args.json:
        print(json.dumps({"image": path, "error": {"code": code, "message": message}}), flush=True)
    print(f"filo inspect: {path}: {message}", file=sys.stderr)
