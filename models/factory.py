"""One factory joining a backbone, a checkpoint and a tap layout into a ready FiLoModel.

Like open_clip's `create_model`, architecture is data (open_clip configs, including the repo's tiny
`FiLo-Tiny-CLIP`) and weights come from a registry tag or a file. The production path never runs
without real weights; random weights exist only for the loudly named demo profile and tests.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import apply_head_state, load_checkpoint
from models.clip_backbone import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_WEIGHTS,
    DEFAULT_IMAGE_SIZE,
    TINY_CLIP_MODEL,
    BackboneSpec,
    create_clip,
    get_tokenizer,
)
from models.errors import CheckpointError, WeightsNotFoundError
from models.filo import FiLoModel
from models.heads import FiLoHeads

log = logging.getLogger(__name__)

DEMO_BANNER = "DEMO PROFILE: random-weight CLIP and Grounding DINO - outputs are NOT real inspection results"
# The demo's heads: trained by scripts/train_demo_checkpoint.sh on `filo synth` data over the demo's
# random tiny CLIP, so that demo heatmaps respond to (synthetic) defects instead of showing noise.
DEMO_CHECKPOINT = str(Path(__file__).resolve().parent / "weights" / "filo-demo-tiny.safetensors")


@dataclass(frozen=True)
class ModelSpec:
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_weights: str | None = DEFAULT_CLIP_WEIGHTS  # None: random backbone (demo/tests only)
    image_size: int = DEFAULT_IMAGE_SIZE
    checkpoint: str | None = None  # None: random heads (demo/tests only)
    tap_layout: str | None = None  # None: what the checkpoint says ("released" for official files)
    n_ctx: int = 12
    seed: int = 0  # random backbone (demo) and, unless head_seed is set, random heads
    demo: bool = False
    fresh_heads: bool = False  # training only: heads may start from PyTorch's init without a checkpoint
    head_seed: int | None = None


DEMO_SPEC = ModelSpec(clip_model=TINY_CLIP_MODEL, clip_weights=None, checkpoint=DEMO_CHECKPOINT, demo=True)


def demo_spec(**overrides: Any) -> ModelSpec:
    """The demo model; `checkpoint=None` keeps the bundled demo heads (pass `random_heads=True` for none)."""
    random_heads = overrides.pop("random_heads", False)
    size = overrides.get("image_size") or DEMO_SPEC.image_size
    if overrides.get("checkpoint") is None:
        # the bundled heads were trained at 518; at another size the demo runs random heads (still demo)
        use_bundled = not random_heads and size == DEFAULT_IMAGE_SIZE
        if not use_bundled and not random_heads:
            log.warning("demo heads are trained for %d px; using random heads at %d px", DEFAULT_IMAGE_SIZE, size)
        overrides["checkpoint"] = DEMO_CHECKPOINT if use_bundled else None
    return replace(DEMO_SPEC, **overrides)


def build_model(spec: ModelSpec, device: str | torch.device = "cpu",
                cache_dir: str | None = None) -> tuple[FiLoModel, dict[str, Any]]:
    """Returns the model (eval mode, on device) and its description for /v1 responses and logs."""
    if not spec.demo and spec.clip_weights is None:
        raise WeightsNotFoundError("production models need CLIP weights; use the demo profile for random ones")
    if not spec.demo and spec.checkpoint is None and not spec.fresh_heads:
        raise WeightsNotFoundError(
            "no FiLo checkpoint given (--checkpoint FILE or FILO_CHECKPOINT): the official .pth files are "
            "linked from https://github.com/CASIA-IVA-Lab/FiLo; `filo train` makes one in the project format. "
            "For a run without real weights use --profile demo."
        )
    state, meta = (load_checkpoint(spec.checkpoint) if spec.checkpoint else ({}, {"format": "random"}))
    _check_compatible(spec, meta)
    tap_layout = spec.tap_layout or meta.get("tap_layout", "released")
    clip = create_clip(BackboneSpec(spec.clip_model, spec.clip_weights, spec.image_size), "cpu", cache_dir,
                       seed=spec.seed)
    width = clip.visual.transformer.width
    embed_dim = clip.text_projection.shape[1]
    token_dim = clip.token_embedding.weight.shape[1]
    torch.manual_seed(spec.seed if spec.head_seed is None else spec.head_seed)
    heads = FiLoHeads(width, embed_dim, token_dim, n_ctx=spec.n_ctx)
    if state:
        apply_head_state(heads, state, source=str(spec.checkpoint))
    model = FiLoModel(clip, get_tokenizer(spec.clip_model), heads, spec.image_size, tap_layout)
    model = model.to(device).eval()
    info = {
        "name": "FiLo",
        "version": _version(spec, meta),
        "tap_layout": tap_layout,
        "backbone": spec.clip_model,
        "clip_weights": spec.clip_weights or "random",
        "image_size": spec.image_size,
        "checkpoint_format": meta.get("format"),
        "profile": "demo" if spec.demo else "production",
    }
    if spec.demo:
        heads = "random" if spec.checkpoint is None else f"from {Path(spec.checkpoint).name}"
        log.warning("%s (FiLo heads: %s)", DEMO_BANNER, heads)
    return model, info


def _check_compatible(spec: ModelSpec, meta: dict[str, Any]) -> None:
    """A project checkpoint records what it was trained with; refuse a mismatched backbone or size."""
    if meta.get("format") in ("official", "random"):
        return
    for key, wanted in (("clip_model", spec.clip_model), ("image_size", spec.image_size)):
        if key in meta and meta[key] != wanted:
            raise CheckpointError(
                f"{spec.checkpoint}: trained with {key}={meta[key]!r} but the model is configured with "
                f"{wanted!r}; pass the matching --clip-model / image size"
            )


def _version(spec: ModelSpec, meta: dict[str, Any]) -> str:
    if spec.checkpoint is None:
        return f"random-seed{spec.seed if spec.head_seed is None else spec.head_seed}"
    h = hashlib.sha256()
    with open(spec.checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{Path(spec.checkpoint).stem}-{h.hexdigest()[:12]}"
