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
    TINY_CLIP_MODEL,
    BackboneSpec,
    config_activation,
    create_clip,
    get_tokenizer,
)
from models.constants import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_WEIGHTS, DEFAULT_IMAGE_SIZE
from models.errors import CheckpointError, WeightsNotFoundError
from models.filo import FiLoModel
from models.heads import FiLoHeads
from models.standin import STANDIN_BANNER, read_standin_record

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
    allow_activation_mismatch: bool = False  # load heads trained with the other activation (outputs then differ)


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
    digest = file_sha256(spec.checkpoint) if spec.checkpoint else None
    info = {
        "name": "FiLo",
        "version": _version(spec, digest),
        "tap_layout": tap_layout,
        "backbone": spec.clip_model,
        "activation": config_activation(spec.clip_model),
        "clip_weights": spec.clip_weights or "random",
        "image_size": spec.image_size,
        "checkpoint_format": meta.get("format"),
        "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
        "checkpoint_sha256": digest,
        "profile": "demo" if spec.demo else "production",
    }
    standins = {name: rec for name, rec in (("clip_weights", _local_standin(spec.clip_weights)),
                                            ("checkpoint", _local_standin(spec.checkpoint))) if rec}
    if standins:
        info["standin"] = True
        info["version"] = "standin-" + info["version"]
        log.warning("%s (%s)", STANDIN_BANNER, ", ".join(sorted(standins)))
    if spec.demo:
        heads = "random" if spec.checkpoint is None else f"from {Path(spec.checkpoint).name}"
        log.warning("%s (FiLo heads: %s)", DEMO_BANNER, heads)
    return model, info


def _local_standin(path: str | None) -> dict[str, Any] | None:
    """The stand-in record of a local weights file (tags and missing files are never stand-ins)."""
    return read_standin_record(path) if path and Path(path).is_file() else None


def _check_compatible(spec: ModelSpec, meta: dict[str, Any]) -> None:
    """A checkpoint records what it was trained with; refuse a mismatched activation, backbone or size.

    Official `.pth` files carry no metadata: they are taken as GELU, the backbone the released code ran.
    The activation is checked first and by itself, because `ViT-L-14-336` and `ViT-L-14-336-quickgelu`
    are the same weights and shapes: nothing else would catch heads paired with the wrong one.
    """
    if meta.get("format") == "random":
        return
    trained = meta.get("activation") or checkpoint_activation(meta)
    built = config_activation(spec.clip_model)
    if trained != built and not spec.allow_activation_mismatch:
        raise CheckpointError(
            f"{spec.checkpoint}: trained with the {trained.upper()} activation but the backbone "
            f"{spec.clip_model!r} builds {built.upper()}; use a backbone with {trained.upper()} "
            f"(e.g. --clip-model {_with_activation(spec.clip_model, trained)}) or pass "
            "--allow-activation-mismatch (FILO_ALLOW_ACTIVATION_MISMATCH=true) to run it anyway"
        )
    if meta.get("format") == "official":
        return
    checks = [("image_size", meta.get("image_size"), spec.image_size)]
    if "clip_model" in meta:
        same = _architecture(meta["clip_model"]) == _architecture(spec.clip_model) if spec.allow_activation_mismatch \
            else meta["clip_model"] == spec.clip_model
        if not same:
            checks.append(("clip_model", meta["clip_model"], spec.clip_model))
    for key, have, wanted in checks:
        if have is not None and have != wanted:
            raise CheckpointError(
                f"{spec.checkpoint}: trained with {key}={have!r} but the model is configured with "
                f"{wanted!r}; pass the matching --clip-model / image size"
            )


def checkpoint_activation(meta: dict[str, Any]) -> str:
    """What a checkpoint was trained with: its record, else its backbone's config, else GELU (official files)."""
    if meta.get("activation"):
        return str(meta["activation"])
    if meta.get("clip_model"):
        return config_activation(str(meta["clip_model"]))
    return "gelu"


_QUICKGELU_SUFFIX = "-quickgelu"


def _architecture(model_name: str) -> str:
    return model_name.removesuffix(_QUICKGELU_SUFFIX)


def _with_activation(model_name: str, activation: str) -> str:
    base = _architecture(model_name)
    return base + _QUICKGELU_SUFFIX if activation == "quickgelu" else base


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(spec: ModelSpec, digest: str | None) -> str:
    if spec.checkpoint is None or digest is None:
        return f"random-seed{spec.seed if spec.head_seed is None else spec.head_seed}"
    return f"{Path(spec.checkpoint).stem}-{digest[:12]}"
