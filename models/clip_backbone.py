"""The frozen CLIP backbone, built by open_clip and brought to FiLo's input size.

The default is what the released FiLo code runs: open_clip's plain `ViT-L-14-336` config (GELU)
with OpenAI's weights, which were trained with QuickGELU. The released factory
(`models/vv_open_clip/factory.py`) builds `CLIP(**get_model_config('ViT-L-14-336'))` for
`pretrained='openai'` at 518 px and loads the OpenAI state dict into it; the published checkpoints
were trained and evaluated on that backbone (spec section 1). `ViT-L-14-336-quickgelu` stays
selectable; a checkpoint records which activation it was trained with.

FiLo runs OpenAI's ViT-L/14@336 at 518 px. open_clip can resize the position grid itself, but
since 3.x it does so with `antialias=True`, a different bicubic kernel from the one the released
FiLo code used (plain bicubic, `align_corners=False`). The published checkpoints were trained on
the plain kernel, so this module always builds the model at its native size and resizes the grid
itself.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from models.constants import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_WEIGHTS, DEFAULT_IMAGE_SIZE
from models.errors import WeightsNotFoundError

log = logging.getLogger(__name__)

TINY_CLIP_MODEL = "FiLo-Tiny-CLIP"
_TINY_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "open_clip"
_registered = False

Activation = Literal["gelu", "quickgelu"]
ACTIVATIONS: tuple[Activation, ...] = ("gelu", "quickgelu")


def register_repo_configs() -> None:
    """Make the repo's model configs (the tiny test/demo CLIP) known to open_clip's factory."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_TINY_CONFIG_DIR)
        _registered = True


def config_activation(model_name: str) -> Activation:
    """The MLP activation `model_name`'s open_clip config builds: it alone decides, for tags and files alike."""
    register_repo_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    return "quickgelu" if cfg.get("quick_gelu", False) else "gelu"


def built_activation(model: open_clip.CLIP) -> Activation:
    """The activation a built CLIP really uses (read from its first vision MLP, not from a name)."""
    act = model.visual.transformer.resblocks[0].mlp.gelu
    return "quickgelu" if type(act).__name__ == "QuickGELU" else "gelu"


def _tag_activation(model_name: str, tag: str) -> Activation | None:
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    return None if not cfg else ("quickgelu" if cfg.get("quick_gelu", False) else "gelu")


@dataclass(frozen=True)
class BackboneSpec:
    model_name: str = DEFAULT_CLIP_MODEL
    weights: str | None = DEFAULT_CLIP_WEIGHTS  # open_clip tag, local file, or None for random (demo only)
    image_size: int = DEFAULT_IMAGE_SIZE


def resize_position_grid(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a (1 + g*g, W) position table to (1 + new_grid**2, W) as the released FiLo code did.

    Plain bicubic, align_corners=False, no antialiasing; the class token's row is kept.
    """
    cls_tok, grid = pos_embed[:1], pos_embed[1:]
    old = int(math.isqrt(grid.shape[0]))
    if old * old != grid.shape[0]:
        raise ValueError(f"position table of {grid.shape[0]} patches is not a square grid")
    if old == new_grid:
        return pos_embed.clone()
    g = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_tok, g], dim=0)


def set_input_size(model: open_clip.CLIP, image_size: int) -> None:
    """Re-target a ViT CLIP to `image_size` (square), resizing its position grid in place."""
    visual = model.visual
    patch = visual.conv1.kernel_size[0]
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    new_grid = image_size // patch
    with torch.no_grad():
        resized = resize_position_grid(visual.positional_embedding.data, new_grid)
    visual.positional_embedding = torch.nn.Parameter(resized, requires_grad=False)
    visual.grid_size = (new_grid, new_grid)
    visual.image_size = (image_size, image_size)


def _weights_hint(model_name: str, weights: str) -> str:
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return (
        f"CLIP weights {weights!r} for {model_name!r} are not available on this machine. "
        f"Either pass a local open_clip state-dict file (--clip-weights /path/to/file.bin or FILO_CLIP_WEIGHTS), "
        f"or put the pretrained tag's files in the Hugging Face cache ({hf_home}) on a machine with internet, "
        f"e.g. `python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{weights}')\"`, "
        f"and copy the cache here (HF_HUB_OFFLINE=1 then reads it). "
        f"For a run without real weights use the demo profile (--profile demo), which is labelled as such."
    )


def create_clip(spec: BackboneSpec, device: str | torch.device = "cpu", cache_dir: str | None = None,
                seed: int = 0) -> open_clip.CLIP:
    """Build the frozen CLIP at `spec.image_size`.

    `spec.weights=None` builds random weights (only the demo profile and tests ask for that);
    otherwise missing weights raise WeightsNotFoundError, never a silent fallback.
    """
    register_repo_configs()
    if spec.model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {spec.model_name!r}")
    weights = spec.weights
    if weights is not None and not os.path.isfile(weights):
        tags = open_clip.list_pretrained_tags_by_model(spec.model_name)
        if weights not in tags:
            raise WeightsNotFoundError(
                f"{weights!r} is neither a local file nor a pretrained tag of {spec.model_name!r} "
                f"(known tags: {', '.join(tags) or 'none'}). " + _weights_hint(spec.model_name, weights)
            )
    if weights is None:
        torch.manual_seed(seed)
    if weights is not None and is_torchscript_archive(weights):
        model = _load_openai_archive(spec.model_name, weights)
        model.eval().requires_grad_(False)
        set_input_size(model, spec.image_size)
        return model.to(device)
    try:
        with warnings.catch_warnings():
            _note_deliberate_activation(spec.model_name, weights)
            model = open_clip.create_model(
                spec.model_name,
                pretrained=weights,
                device="cpu",
                precision="fp32",
                cache_dir=cache_dir,
                require_pretrained=weights is not None,
                weights_only=True,
            )
    except (OSError, RuntimeError) as exc:  # hub misses surface as OSError subclasses or RuntimeError
        if weights is not None and not _looks_like_shape_error(exc):
            raise WeightsNotFoundError(_weights_hint(spec.model_name, weights) + f" (cause: {exc})") from exc
        raise
    model.eval().requires_grad_(False)
    set_input_size(model, spec.image_size)
    return model.to(device)


def _note_deliberate_activation(model_name: str, weights: str | None) -> None:
    """Replace open_clip's QuickGELU-mismatch warning by one line saying why the mismatch is wanted.

    Must run inside `warnings.catch_warnings()`; only the mismatch warning is silenced.
    """
    if weights is None or os.path.isfile(weights):
        return
    tag_act, cfg_act = _tag_activation(model_name, weights), config_activation(model_name)
    if tag_act is None or tag_act == cfg_act:
        return
    warnings.filterwarnings("ignore", message="QuickGELU mismatch", category=UserWarning)
    log.info("CLIP %s builds %s although the %r weights were trained with %s: deliberate, this is the backbone "
             "the released FiLo code runs and its checkpoints were trained on (spec section 1)",
             model_name, cfg_act.upper(), weights, tag_act.upper())


def is_torchscript_archive(path: str) -> bool:
    """OpenAI's own CLIP files (e.g. ViT-L-14-336px.pt) are TorchScript zip archives, not state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("constants.pkl") for n in zf.namelist())


def _load_openai_archive(model_name: str, path: str) -> open_clip.CLIP:
    """OpenAI's TorchScript archive, read into the *named* config (so the config decides the activation).

    The archive's tensors are OpenAI's (fp16) in open_clip's own naming; loading them strictly into
    `model_name`'s architecture also checks that the file is that model. torch.jit.load runs no pickled
    Python, only TorchScript, and only for this official file format.
    """
    archive = torch.jit.load(path, map_location="cpu")
    state = {k: v.float() for k, v in archive.state_dict().items()
             if k not in ("input_resolution", "context_length", "vocab_size", "attn_mask")}
    model = open_clip.create_model(model_name, pretrained=None, device="cpu", precision="fp32")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not hold the {model_name!r} architecture: {exc}") from exc
    return model


def _looks_like_shape_error(exc: Exception) -> bool:
    msg = str(exc)
    return "size mismatch" in msg or "Missing key" in msg or "Unexpected key" in msg


def make_preprocess(image_size: int = DEFAULT_IMAGE_SIZE, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD):
    """open_clip's own eval preprocess at `image_size`: bicubic shorter side, center crop, normalise."""
    return open_clip.image_transform(
        image_size, is_train=False, mean=mean, std=std, interpolation="bicubic", resize_mode="shortest"
    )


def get_tokenizer(model_name: str):
    register_repo_configs()
    return open_clip.get_tokenizer(model_name)
