"""FiLo checkpoints: the official `.pth` files and the project's own safetensors format.

Official files are torch pickles `{"filo": state_dict}` whose state dict also carries the frozen
CLIP weights (`clip_model.*`, `text_encoder.*`); they are read with `weights_only=True` (no code
runs) and only the trainable heads are kept. The project's own files are safetensors with a JSON
metadata entry saying how the weights were trained (backbone, size, tap layout, descriptions).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.clip_backbone import ACTIVATIONS, config_activation
from models.errors import CheckpointError
from models.heads import FiLoHeads

PROJECT_FORMAT = "filo-inspect/v1"
HEAD_PREFIXES = ("decoder_linear.", "decoder_cov.", "adapter.", "normal_prompt_learner.", "abnormal_prompt_learner.")
FROZEN_PREFIXES = ("clip_model.", "text_encoder.")
METADATA_KEY = "filo"


def is_safetensors(path: str | Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read either format; returns (head state dict, metadata). Metadata of official files is inferred."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if is_safetensors(path):
        return _load_project(path)
    return _load_official(path)


def _load_official(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: report, never retry unsafely
        raise CheckpointError(f"{path}: not a loadable official FiLo checkpoint ({exc})") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("filo"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'filo' state dict (official FiLo format)")
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in obj["filo"].items():
        if key.startswith(FROZEN_PREFIXES):
            continue
        if key.startswith(HEAD_PREFIXES) and isinstance(value, torch.Tensor):
            state[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys in the FiLo state dict: {sorted(unknown)[:20]}")
    # no metadata in the file: it is what the released code trained, i.e. GELU on the plain ViT-L-14-336
    meta = {"format": "official", "tap_layout": "released", "activation": "gelu", "source": str(path)}
    return state, meta


def _load_project(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = (f.metadata() or {}).get(METADATA_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has keys(), not __iter__)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    if raw_meta is None:
        raise CheckpointError(f"{path}: safetensors file without FiLo metadata (not a {PROJECT_FORMAT} checkpoint)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt FiLo metadata ({exc})") from exc
    if meta.get("format") != PROJECT_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {PROJECT_FORMAT!r}")
    return state, meta


def apply_head_state(heads: FiLoHeads, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load head weights, refusing (and naming the keys) on any missing, extra or mis-shaped tensor."""
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad_shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    if bad_shapes:
        problems.append("shape mismatches: " + "; ".join(bad_shapes))
    if problems:
        raise CheckpointError(
            f"{source} does not fit this model's heads (is it for another backbone?): " + " | ".join(problems)
        )
    heads.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def save_checkpoint(path: str | Path, heads: FiLoHeads, metadata: dict[str, Any]) -> Path:
    """Write the heads as safetensors with FiLo metadata (format, backbone, activation, size, tap layout, ...).

    The activation is recorded explicitly (from the backbone's config unless given), so that a checkpoint
    is never paired silently with the same-shaped backbone of the other activation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": PROJECT_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **metadata}
    for required in ("clip_model", "image_size", "tap_layout"):
        if required not in meta:
            raise ValueError(f"checkpoint metadata needs {required!r}")
    if "activation" not in meta:
        meta["activation"] = config_activation(str(meta["clip_model"]))
    if meta["activation"] not in ACTIVATIONS:
        raise ValueError(f"checkpoint activation must be one of {ACTIVATIONS}, got {meta['activation']!r}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    tmp.replace(path)  # atomic: a crash mid-save never leaves a truncated checkpoint behind
    return path
