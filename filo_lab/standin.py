"""Write deterministic stand-in weight files of the real shapes and formats (see `models/standin.py`).

Three files, each exactly what the production loaders read, so that a run on them goes through the
production profile's code path and costs what real weights cost:

- `clip-standin.safetensors`: an open_clip `ViT-L-14-336` state dict at its native 336 px
  in fp16 (as OpenAI ships it), for `--clip-weights`;
- `filo-standin.pth`: FiLo heads in the official `{"filo": state_dict}` layout, for `--checkpoint`;
- `grounding-dino-standin/`: a `save_pretrained` directory of `GroundingDinoForObjectDetection`
  with grounding-dino-tiny's configuration, for `--grounding-model`. Its tokenizer is the repository's
  small WordPiece vocabulary (the real bert-base-uncased vocabulary cannot be fetched everywhere); ids
  stay below the model's 30522, so the text tower's cost is the real one.

`arch="tiny"` writes the same three files for the repository's tiny test architectures, so that a CPU dry
run (`scripts/gpu_check.sh --dry-run`) and the tests take exactly the production path. Each carries a
`filo_standin` record; the service then reports `standin: true` and logs a banner.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.standin import STANDIN_KEY, standin_record

CLIP_FILE = "clip-standin.safetensors"
FILO_FILE = "filo-standin.pth"
GROUNDING_DIR = "grounding-dino-standin"
# arch -> open_clip model; "tiny" (the repository's test architecture) lets a CPU dry run take the same path
CLIP_MODELS = {"real": "ViT-L-14-336", "tiny": "FiLo-Tiny-CLIP"}


def _native_clip(arch: str, seed: int):
    import open_clip

    from models.clip_backbone import register_repo_configs

    register_repo_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(CLIP_MODELS[arch], pretrained=None)


def write_clip(out: Path, seed: int, arch: str) -> Path:
    from safetensors.torch import save_file

    path = out / CLIP_FILE
    native = _native_clip(arch, seed)
    state = {k: v.detach().half().contiguous() for k, v in native.state_dict().items()}
    meta = {STANDIN_KEY: json.dumps(standin_record("open_clip state dict", seed, model=CLIP_MODELS[arch]))}
    save_file(state, str(path), metadata=meta)
    return path


def write_filo(out: Path, seed: int, arch: str) -> Path:
    from models.heads import FiLoHeads

    path = out / FILO_FILE
    clip = _native_clip(arch, 0)  # shapes only
    dims = clip.visual.transformer.width, clip.text_projection.shape[1], clip.token_embedding.weight.shape[1]
    torch.manual_seed(seed)
    heads = FiLoHeads(*dims)
    with torch.no_grad():  # PyTorch's init leaves some heads at zero; perturb so every path computes
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    record = json.dumps(standin_record("official FiLo checkpoint", seed))
    torch.save({"filo": heads.state_dict(), STANDIN_KEY: record}, path)
    return path


def write_grounding(out: Path, seed: int, arch: str) -> Path:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from models.grounding.detector import load_tiny_config, load_tiny_tokenizer

    path = out / GROUNDING_DIR
    # real: grounding-dino-tiny's architecture (Swin-T, BERT-base text tower); tiny: the test configuration
    config = GroundingDinoConfig() if arch == "real" else load_tiny_config()
    setattr(config, STANDIN_KEY, standin_record("Grounding DINO save_pretrained directory", seed,
                                                model="grounding-dino-tiny"))
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config)
    model.save_pretrained(path)
    load_tiny_tokenizer().save_pretrained(path)
    return path


PARTS = ("clip", "filo", "grounding")


def write_standin_weights(out: str | Path, seed: int = 0, parts: tuple[str, ...] = PARTS, arch: str = "real",
                          ) -> dict[str, Path]:
    """Write the chosen stand-in files into `out` (created); returns {part: path}. Same seed, same tensors."""
    if arch not in CLIP_MODELS:
        raise ValueError(f"arch must be one of {sorted(CLIP_MODELS)}, got {arch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writers = {"clip": write_clip, "filo": write_filo, "grounding": write_grounding}
    return {part: writers[part](out, seed + i, arch) for i, part in enumerate(PARTS) if part in parts}


def production_env(paths: dict[str, Path], arch: str = "real") -> dict[str, str]:
    """The FILO_* variables that serve the stand-ins with the production profile."""
    env = {"FILO_PROFILE": "production", "FILO_CLIP_MODEL": CLIP_MODELS[arch]}
    if arch == "tiny" and "filo" in paths:
        # an official-format file is taken as GELU; the tiny test CLIP is QuickGELU (random heads either way)
        env["FILO_ALLOW_ACTIVATION_MISMATCH"] = "true"
    if "clip" in paths:
        env["FILO_CLIP_WEIGHTS"] = str(paths["clip"])
    if "filo" in paths:
        env["FILO_CHECKPOINT"] = str(paths["filo"])
    if "grounding" in paths:
        env["FILO_GROUNDING_MODEL"] = str(paths["grounding"])
    return env
