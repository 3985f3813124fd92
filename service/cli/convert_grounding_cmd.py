"""`filo convert-grounding CHECKPOINT --out DIR`: the authors' Grounding DINO fine-tunes into transformers.

Reads an original IDEA-Research (flat or ``{"model": ...}``) or MMDetection (``{"state_dict": ...}``)
Grounding DINO checkpoint with ``torch.load(weights_only=True)``, maps it onto transformers'
``GroundingDinoForObjectDetection`` (``models.grounding.convert_to_hf``, rules in ``models.grounding.convert_rules``)
and writes DIR with ``save_pretrained`` plus the config, tokenizer and image processor of ``--base``.
Exit codes: 0 written; 2 refused (unreadable file, unknown layout, a weight missing or mis-shaped, keys
left over, unavailable base, existing DIR), nothing written then.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.constants import DEFAULT_GROUNDING_MODEL


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-grounding",
        help="convert an original/MMDetection Grounding DINO checkpoint for --grounding-model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the .pth file (e.g. grounding_train_on_mvtec.pth)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write (must not exist)")
    p.add_argument("--base", default=DEFAULT_GROUNDING_MODEL,
                   help="hub id or local directory giving config, tokenizer, image processor "
                   f"({DEFAULT_GROUNDING_MODEL})")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=run)


def _say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def _refuse(text: str) -> int:
    _say(f"filo convert-grounding: refused: {text}")
    _say("nothing was written")
    return 2


def run(args: argparse.Namespace) -> int:
    from models.grounding import convert_to_hf as gc
    from service.settings import FiloSettings

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        return _refuse(f"{out} exists and is not empty (pass --overwrite to replace it)")
    _say(f"reading {args.checkpoint} (torch.load, weights_only=True)")
    try:
        source = gc.read_checkpoint(args.checkpoint)
    except gc.CheckpointError as exc:
        return _refuse(str(exc))
    print(source.layout)
    if source.stubbed:
        print(f"ignored non-tensor objects stored beside the weights: {', '.join(source.stubbed[:6])}")
    _say(f"reading --base {args.base} (config, tokenizer, image processor)")
    try:
        config, processor = gc.load_base(args.base, local_files_only=FiloSettings().hub_offline)
    except (OSError, ValueError) as exc:
        return _refuse(
            f"--base {args.base} is not available: {type(exc).__name__}: {exc}\n"
            "Pass a local directory holding config.json, the tokenizer and the image-processor config "
            f"(e.g. {DEFAULT_GROUNDING_MODEL} fetched with `hf download` on a machine with internet)."
        )
    _say("building the target model")
    conversion, model = gc.convert_checkpoint(source, config)
    _report(conversion)
    if model is None:
        return _refuse(gc.refusal_text(conversion))
    _say(f"writing {out}, then reloading it with GroundingDinoForObjectDetection.from_pretrained to verify")
    compared = gc.save_verified(model, processor, conversion.tensors, out)
    print(f"wrote {out}: {compared} tensors, reloaded and identical; use it with --grounding-model {out}")
    return 0


def _report(conversion) -> None:
    print(f"mapped {len(conversion.tensors)} weights of GroundingDinoForObjectDetection")
    if conversion.dropped:
        print("dropped on purpose:")
        for line in _group_dropped(conversion.dropped):
            print(f"  {line}")
    for target, reason in conversion.filled:
        print(f"filled without a source: {target}\n      why safe: {reason}")
    for note in conversion.notes:
        print(f"note: {note}")


def _group_dropped(dropped: list[tuple[str, str]]) -> list[str]:
    """One line per reason: count, a few example keys, the reason."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in dropped:
        by_reason.setdefault(reason, []).append(key)
    lines = []
    for reason, keys in by_reason.items():
        examples = ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "")
        lines.append(f"{len(keys)} x {examples}\n      why safe: {reason}")
    return lines
