"""What the commands share: the model options and the settings they make, the errors they refuse with exit 2,
logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from descriptions import DescriptionsError, UnknownCategoryError
from models.errors import CheckpointError, WeightsNotFoundError
from service.settings import FiloSettings

# What building a model from the settings raises when the user has something to fix (weights not on this
# machine, a checkpoint that does not fit, an unknown category, a broken descriptions file): a command prints
# the message and exits 2 instead of showing a traceback.
MODEL_ERRORS: tuple[type[Exception], ...] = (
    UnknownCategoryError, DescriptionsError, WeightsNotFoundError, CheckpointError,
)


def dataset_errors() -> tuple[type[Exception], ...]:
    """`MODEL_ERRORS`, a dataset that cannot be read and a value that does not fit (a ValueError: more shots
    than good images, a batch size below 1): what the lab's commands over a dataset (eval, calibrate, train)
    refuse with exit 2. A function, so that the lab is imported only by the commands that use it."""
    from filo_lab.data import DatasetError

    return (*MODEL_ERRORS, DatasetError, ValueError)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--profile", choices=["production", "demo"], default=None,
                   help="demo = tiny random models, loudly labelled (default: $FILO_PROFILE or production)")
    g.add_argument("--demo-heads", choices=["trained", "random"], default=None,
                   help="demo profile: bundled heads trained on synthetic data (default) or random ones")
    g.add_argument("--clip-model", default=None,
                   help="open_clip model name (default ViT-L-14-336: GELU, the backbone the released FiLo code runs)")
    g.add_argument("--clip-weights", default=None, help="open_clip pretrained tag or local state-dict file")
    g.add_argument("--checkpoint", default=None, help="FiLo checkpoint: official .pth or project .safetensors")
    g.add_argument("--tap-layout", choices=["released", "paper"], default=None,
                   help="override the checkpoint's tap layout")
    g.add_argument("--allow-activation-mismatch", action="store_true", default=None,
                   help="load a checkpoint into a backbone whose activation (GELU/QuickGELU) differs from the one "
                        "it was trained with (its outputs then differ from the trained model's)")
    g.add_argument("--grounding-model", default=None, help="Grounding DINO hub id or local directory")
    g.add_argument("--descriptions", action="append", default=None, metavar="FILE",
                   help="extra category descriptions file (repeatable)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    g.add_argument("--image-size", type=int, default=None)


def settings_from_args(args: argparse.Namespace, **extra) -> FiloSettings:
    """Environment (FILO_*) first, then any flag given on the command line."""
    overrides = {
        "profile": args.profile,
        "demo_heads": args.demo_heads,
        "clip_model": args.clip_model,
        "clip_weights": args.clip_weights,
        "checkpoint": args.checkpoint,
        "tap_layout": args.tap_layout,
        "allow_activation_mismatch": getattr(args, "allow_activation_mismatch", None),
        "grounding_model": args.grounding_model,
        "descriptions": args.descriptions,
        "device": args.device,
        "precision": args.precision,
        "image_size": args.image_size,
        # the service commands' own flags (serve, worker)
        "redis_url": getattr(args, "redis_url", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        **extra,
    }
    return FiloSettings(**{k: v for k, v in overrides.items() if v is not None})


def with_dataset_descriptions(settings: FiloSettings, data: str | os.PathLike) -> FiloSettings:
    """A dataset root holding a descriptions.json (what `filo synth` writes) has it loaded too.

    The dataset's own texts come first, so files named by flag or environment still win.
    """
    auto = Path(data) / "descriptions.json"
    if not auto.is_file() or auto in settings.descriptions:
        return settings
    return settings.model_copy(update={"descriptions": [auto, *settings.descriptions]})


def dataset_settings(args: argparse.Namespace) -> FiloSettings:
    """The settings of a command over a dataset (eval, calibrate): the flags and environment, `--grounding`,
    and the dataset's own descriptions.json; the demo profile is announced."""
    settings = with_dataset_descriptions(settings_from_args(args, grounding=args.grounding == "on"), args.data)
    announce_profile(settings)
    return settings


def split_names(text: str | None) -> list[str] | None:
    """A comma-separated `--categories` value as a list (None: all)."""
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def setup_logging(level: str | bool = "info") -> None:
    """One log format for every command; `level` is a level name, or True/False for --verbose."""
    if isinstance(level, bool):
        level = "debug" if level else "info"
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def announce_profile(settings: FiloSettings) -> None:
    if settings.is_demo:
        from models.factory import DEMO_BANNER

        print(f"*** {DEMO_BANNER} ***", file=sys.stderr)
