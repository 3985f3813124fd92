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
import os
import shutil
import sys
import tempfile
from pathlib import Path

from models.constants import DEFAULT_GROUNDING_MODEL

SHOW = 20  # keys named in a refusal


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


def _listing(items: list[str]) -> str:
    shown = "\n".join(f"  {item}" for item in items[:SHOW])
    more = f"\n  ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return f"{shown}{more}"


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


def _load_base(base: str):
    """(config, processor) of --base; raises OSError/ValueError with transformers' message when unavailable."""
    from transformers import AutoConfig, AutoProcessor

    from service.settings import FiloSettings

    local_only = FiloSettings().hub_offline
    config = AutoConfig.from_pretrained(base, local_files_only=local_only)
    if getattr(config, "model_type", None) != "grounding-dino":
        raise ValueError(f"--base {base} is a {getattr(config, 'model_type', '?')!r} config, not grounding-dino")
    processor = AutoProcessor.from_pretrained(base, local_files_only=local_only)
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ValueError(f"--base {base} has no Grounding DINO processor (tokenizer + image processor files)")
    return config, processor


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        return _refuse(f"{out} exists and is not empty (pass --overwrite to replace it)")
    try:
        state_dict, naming = _read_checkpoint(args.checkpoint)
        config, processor = _read_base(args.base)
        model, conversion = _convert(state_dict, naming, config)
    except _Refused as exc:
        return _refuse(str(exc))
    compared = _write_verified(model, processor, conversion, out)
    print(f"wrote {out}: {compared} tensors, reloaded and identical; use it with --grounding-model {out}")
    return 0


class _Refused(Exception):
    """A step refused; its message says why (nothing was written)."""


def _read_checkpoint(path: str):
    """(state dict, naming) of the checkpoint file; its layout is printed. Refuses an unreadable file."""
    from models.grounding import convert_to_hf as gc

    _say(f"reading {path} (torch.load, weights_only=True)")
    try:
        loaded, stubbed = gc.load_checkpoint(path)
        container, state_dict = gc.unwrap(loaded)
        naming = gc.detect_naming(state_dict)
    except gc.CheckpointError as exc:
        raise _Refused(str(exc)) from exc
    print(gc.describe_layout(container, naming))
    if stubbed:
        print(f"ignored non-tensor objects stored beside the weights: {', '.join(stubbed[:6])}")
    return state_dict, naming


def _read_base(base: str):
    """(config, processor) of --base, or a refusal saying how to make it available."""
    _say(f"reading --base {base} (config, tokenizer, image processor)")
    try:
        return _load_base(base)
    except (OSError, ValueError) as exc:
        raise _Refused(
            f"--base {base} is not available: {type(exc).__name__}: {exc}\n"
            "Pass a local directory holding config.json, the tokenizer and the image-processor config "
            f"(e.g. {DEFAULT_GROUNDING_MODEL} fetched with `hf download` on a machine with internet)."
        ) from exc


def _convert(state_dict, naming: str, config):
    """(model holding the converted weights, conversion); the conversion is reported, and refused unless complete."""
    import torch

    from models.grounding import convert_to_hf as gc

    _say("building the target model")
    with torch.random.fork_rng(devices=[]):
        model = gc.build_model(config)
    conversion = gc.convert_state_dict(
        state_dict, naming, gc.target_shapes(model), gc.model_constants(config),
        share_decoder_box_head=bool(config.decoder_bbox_embed_share),
    )
    _report(conversion)
    if not conversion.ok:
        raise _Refused(_refusal_text(conversion))
    if not conversion.share_decoder_box_head and config.decoder_bbox_embed_share:
        config.decoder_bbox_embed_share = False
        with torch.random.fork_rng(devices=[]):
            model = gc.build_model(config)
    gc.load_converted(model, conversion.tensors)
    return model, conversion


def _write_verified(model, processor, conversion, out: Path) -> int:
    """Write the model and processor beside `out`, reload and compare them, then move them to `out` (replacing
    it); returns how many tensors compared equal. Nothing is left behind when a step fails."""
    from models.grounding import convert_to_hf as gc

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _say(f"writing {out}")
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        _say("reloading it with GroundingDinoForObjectDetection.from_pretrained to verify")
        compared = gc.verify_saved(staging, conversion.tensors)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        umask = os.umask(0)
        os.umask(umask)
        out.chmod(0o777 & ~umask)  # mkdtemp made it private
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return compared


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


def _refusal_text(conversion) -> str:
    parts = []
    if conversion.missing:
        by_source: dict[str, list[str]] = {}
        for source, target in conversion.missing:
            by_source.setdefault(source, []).append(target)
        items = [f"{source}  (-> {', '.join(targets)})" for source, targets in by_source.items()]
        parts.append(
            f"{len(items)} tensor(s) missing from the checkpoint, leaving {len(conversion.missing)} weight(s) of the "
            f"target model unfilled:\n{_listing(items)}"
        )
    if conversion.mismatched:
        parts.append(f"{len(conversion.mismatched)} tensor(s) do not fit the target model:\n{_listing(conversion.mismatched)}")
    if conversion.unused:
        parts.append(
            f"{len(conversion.unused)} checkpoint key(s) have no place in the target model (another architecture "
            f"or config than --base?):\n{_listing(conversion.unused)}"
        )
    if conversion.refused_values:
        parts.append(f"{len(conversion.refused_values)} value(s) cannot be expressed:\n{_listing(conversion.refused_values)}")
    return "\n".join(parts)
