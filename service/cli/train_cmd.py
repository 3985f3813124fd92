"""`filo train`: learn FiLo's heads on an auxiliary dataset (the released two-phase recipe).

Phase 1 trains the prompt learners and the linear/MMCI decoders on pixel masks, phase 2 the adapter
on image labels; CLIP stays frozen. The released recipe trains on one benchmark's *test* split and
evaluates zero-shot on another (MVTec AD -> VisA, VisA -> MVTec AD), hence `--split test` by default.
After each epoch OUT holds epoch_N.safetensors, last.safetensors, loss_log.jsonl, loss.png and the
resume state; `--resume OUT` continues after the last completed epoch.

Category texts: every training category must be in the catalog (bundled MVTec AD / VisA files, plus
--descriptions FILE). A dataset root holding a descriptions.json (what `filo synth` writes) has it
loaded automatically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from service.cli.common import (
    add_model_args,
    announce_profile,
    dataset_errors,
    settings_from_args,
    setup_logging,
    with_dataset_descriptions,
)

# flag name -> TrainConfig field, for the flags whose default lives in TrainConfig (None = not given)
_CONFIG_FLAGS = {
    "layout": "layout",
    "split": "split",
    "epochs_phase1": "epochs_phase1",
    "epochs_phase2": "epochs_phase2",
    "lr_prompt": "lr_prompt",
    "lr_decoder": "lr_decoder",
    "lr_adapter": "lr_adapter",
    "batch_size": "batch_size",
    "max_images": "max_images",
    "seed": "seed",
    "workers": "workers",
    "keep_last": "keep_last",
    "mask_interpolation": "mask_interpolation",
}
# model settings a resumed run takes from its saved state unless the flag is given again
_RESUMED_MODEL_FIELDS = ("profile", "clip_model", "clip_weights", "image_size", "tap_layout")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train FiLo's heads on a dataset (two phases)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="dataset root (required unless --resume)")
    p.add_argument("--layout", choices=["auto", "mvtec", "visa", "folder"], default=None, help="(auto)")
    p.add_argument("--categories", default=None, help="comma-separated subset of the dataset's categories")
    p.add_argument("--split", choices=["test", "train"], default=None,
                   help="dataset split to train on (test: the released recipe)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/train-<time>)")
    p.add_argument("--epochs-phase1", type=int, default=None, help="segmentation epochs (15)")
    p.add_argument("--epochs-phase2", type=int, default=None, help="adapter epochs (5)")
    p.add_argument("--lr-prompt", type=float, default=None, help="prompt learners' learning rate (1e-3)")
    p.add_argument("--lr-decoder", type=float, default=None, help="decoder_linear/decoder_cov learning rate (1e-4)")
    p.add_argument("--lr-adapter", type=float, default=None, help="adapter learning rate, phase 2 (1e-5)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (1)")
    p.add_argument("--max-images", type=int, default=None, help="at most N images per category (all)")
    p.add_argument("--seed", type=int, default=None, help="head initialisation and shuffling seed (0)")
    p.add_argument("--workers", type=int, default=None, help="data loader worker processes (0)")
    p.add_argument("--keep-last", type=int, default=None,
                   help="keep only the newest K epoch_N checkpoints (default: all; ViT-L heads are ~0.9 GB each)")
    p.add_argument("--mask-interpolation", choices=["bilinear", "nearest"], default=None,
                   help="mask resize before the 0.5 threshold (bilinear, as the released code)")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue the run in DIR after its last completed epoch")
    p.add_argument("-v", "--verbose", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    from descriptions import CategoryCatalog
    from filo_lab.training.trainer import Trainer, build_training_model, read_train_state

    try:
        saved = read_train_state(args.resume) if args.resume else None
        config = _config(args, saved)
        settings = _settings(args, saved, config)
        announce_profile(settings)
        catalog = CategoryCatalog.load(settings.descriptions)
        clip_model, clip_weights = _backbone(settings)
        model = build_training_model(
            clip_model, clip_weights, settings.image_size, settings.tap_layout or "released",
            checkpoint=None if saved else settings.checkpoint, seed=config.seed,
            device=settings.resolved_device(), cache_dir=str(settings.cache_dir) if settings.cache_dir else None,
        )
        meta = {**(saved or {}).get("model", {}),
                "clip_model": clip_model, "clip_weights": clip_weights or "random", "profile": settings.profile}
        if settings.checkpoint and not saved:
            meta["init_checkpoint"] = str(settings.checkpoint)  # fine-tuning: where the heads started
        bf16 = False if args.precision == "fp32" else None  # default: bf16 autocast on CUDA only
        trainer = Trainer(model, catalog, config, meta, progress=True, bf16=bf16)
        print(f"training on {len(trainer.samples)} images of {len(trainer.names)} categories "
              f"({', '.join(trainer.names.values())}) -> {config.out}", file=sys.stderr)
        result = trainer.run(resume=saved is not None)
    except (*dataset_errors(), FileExistsError, FileNotFoundError) as exc:
        print(f"filo train: {exc}", file=sys.stderr)
        return 2
    _summary(result, config, settings)
    return 0


def _config(args: argparse.Namespace, saved: dict | None):
    """TrainConfig from the flags; on resume, the saved config with the flags given again on top."""
    from filo_lab.training.trainer import TrainConfig

    given = {field: getattr(args, flag) for flag, field in _CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    if args.categories is not None:
        given["categories"] = [c.strip() for c in args.categories.split(",") if c.strip()]
    if saved is not None:
        base = dict(saved["config"])
        if args.data is not None and Path(args.data) != Path(base["data"]):
            raise ValueError(f"--resume {args.resume}: the run trained on {base['data']}, not {args.data}")
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise ValueError("--out and --resume name different directories; a resumed run stays in its own")
        done, old_phase1 = int(saved["epoch"]), int(base["epochs_phase1"])
        new_phase1 = given.get("epochs_phase1", old_phase1)
        if new_phase1 != old_phase1 and (done > old_phase1 or new_phase1 < done):
            raise ValueError(f"--epochs-phase1 {new_phase1}: the run already finished epoch {done} "
                             f"with {old_phase1} phase-1 epochs; the phases cannot be re-cut there")
        base.update(given)
        base["out"] = str(args.resume)
        return TrainConfig.from_dict(base)
    if args.data is None:
        raise ValueError("--data ROOT is required (or --resume DIR)")
    out = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    return TrainConfig(data=str(args.data), out=str(out), **given)


def _settings(args: argparse.Namespace, saved: dict | None, config):
    """Model settings from the flags (and env); a resumed run keeps its saved backbone unless overridden."""
    extra: dict = {"grounding": False}
    if saved is not None:
        for key in _RESUMED_MODEL_FIELDS:
            value = saved.get("model", {}).get(key)
            if value is not None and value != "random" and getattr(args, key, None) is None:
                extra[key] = value
    return with_dataset_descriptions(settings_from_args(args, **extra), config.data)


def _backbone(settings) -> tuple[str, str | None]:
    """(open_clip model, weights) the run trains on; the demo profile is the tiny random CLIP."""
    if settings.is_demo:
        from models.clip_backbone import TINY_CLIP_MODEL

        return TINY_CLIP_MODEL, None
    return settings.clip_model, settings.clip_weights


def _summary(result, config, settings) -> None:
    from service.settings import FiloSettings

    for record in result.history:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in record.parts.items())
        print(f"epoch {record.epoch:3d} (phase {record.phase}): loss {record.loss:.4f} ({parts}), "
              f"{record.images} images, {record.seconds:.1f}s")
    if result.last_checkpoint is None:
        print("no epoch was run", file=sys.stderr)
        return
    flags = ["--checkpoint", str(result.last_checkpoint)]
    if settings.is_demo:
        flags = ["--profile", "demo", *flags]
    else:  # the checkpoint names its backbone; its weights' location is this machine's business
        defaults = FiloSettings.model_fields
        for name in ("clip_model", "clip_weights"):
            if getattr(settings, name) != defaults[name].default:
                flags += [f"--{name.replace('_', '-')}", str(getattr(settings, name))]
    if settings.image_size != 518:
        flags += ["--image-size", str(settings.image_size)]
    print(f"checkpoint: {result.last_checkpoint}")
    print(f"use it with: filo inspect IMAGE --category NAME {' '.join(flags)}")
