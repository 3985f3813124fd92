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

Grounding DINO's stand-in comes in two kinds (`GROUNDING_KINDS`). "realistic" (the default, what the GPU check
and the service figures use) boxes like trained weights: `realistic_boxes` sets its weights so that a handful
of queries (`REALISTIC_BOXES`) pass the 0.25 box threshold on any image, as trained weights keep a handful of
boxes on a product image. "worst-case" is the plain random initialisation, under which most of the 900 queries
pass (756 on one random image) and post-processing handles hundreds of boxes per image, which no trained model
causes. The network computes the same operations on both (every layer runs; only values differ).

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


def grounding_model(seed: int, arch: str, kind: str = "realistic"):
    """A `GroundingDinoForObjectDetection` of the chosen architecture (real: grounding-dino-tiny's, Swin-T and a
    BERT-base text tower; tiny: the test configuration), seeded, of the chosen `GROUNDING_KINDS` kind; the
    global RNG is left as it was."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from models.grounding.detector import load_tiny_config

    if kind not in GROUNDING_KINDS:
        raise ValueError(f"kind must be one of {', '.join(GROUNDING_KINDS)}, got {kind!r}")
    config = GroundingDinoConfig() if arch == "real" else load_tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config)
    if kind == "realistic":
        realistic_boxes(model, seed=seed)
    return model


def write_grounding(out: Path, seed: int, arch: str, kind: str = "realistic") -> Path:
    from models.grounding.detector import load_tiny_tokenizer

    path = out / GROUNDING_DIR
    model = grounding_model(seed, arch, kind)
    boxes = f"{REALISTIC_BOXES} queries pass the box threshold on any image" if kind == "realistic" \
        else "random initialisation: most queries pass the box threshold"
    setattr(model.config, STANDIN_KEY, standin_record("Grounding DINO save_pretrained directory", seed,
                                                      model="grounding-dino-tiny", boxes=kind, boxing=boxes))
    model.save_pretrained(path)
    load_tiny_tokenizer().save_pretrained(path)
    return path


PARTS = ("clip", "filo", "grounding")
GROUNDING_KINDS = ("realistic", "worst-case")
REALISTIC_BOXES = 4  # queries over the box threshold on every image (trained weights: a handful on a product)
# logits (before the sigmoid) of the realistic stand-in's boxing queries and of all others: far from the 0.25
# threshold (logit -1.1) on both sides, so that no image moves a query across it
REALISTIC_LOGITS = (2.0, -6.0)
REALISTIC_TEXT_SPREAD = 0.01  # how much of the text features is left to depend on the caption and image


def _zero_mean_directions(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthonormal directions with zero mean over the features (a LayerNorm keeps them as they are)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    a = a - a.mean()
    a = a / a.norm()
    b = b - b.mean()
    b = b - (b @ a) * a
    return a, b / b.norm()


def realistic_boxes(model, boxes: int = REALISTIC_BOXES, seed: int = 0) -> list[int]:
    """Set a `GroundingDinoForObjectDetection`'s weights, in place, so that exactly `boxes` of its queries pass
    the box threshold whatever the image and caption; returns their indices.

    A query's class logit for caption token t is the decoder's final hidden state `h_q` dotted with the
    encoder's final text feature `text_t`. Here: every decoder sublayer's output projection is zero (each still
    runs: attention, deformable sampling and feed-forward cost what they cost), so `h_q` is the LayerNorm of the
    query's own learned target, image independent; the targets of `boxes` queries point along one direction,
    the others along an orthogonal one. The last text LayerNorm leaves 1% of each token's feature (gain 0.01)
    and adds a fixed bias, so `text_t` is nearly the same for every token. The boxing queries then score
    logit ~2.0 (0.88) on every caption token, the others ~-6.0 (0.0025), each within a fraction of a logit.
    Box coordinates still come from the encoder's proposals of the image, refined by the decoder.
    """
    d = model.config.d_model
    queries = model.model.query_position_embeddings.weight
    count = queries.shape[0]
    if not 1 <= boxes <= count:
        raise ValueError(f"boxes must be between 1 and {count}, got {boxes}")
    boxing, other = _zero_mean_directions(d, seed)
    chosen = torch.linspace(0, count - 1, boxes).round().long().tolist()  # spread over the query order
    with torch.no_grad():
        decoder = model.model.decoder
        for layer in decoder.layers:
            for projection in (layer.self_attn.out_proj, layer.encoder_attn_text.out_proj,
                               layer.encoder_attn.output_proj, layer.fc2):
                projection.weight.zero_()
                projection.bias.zero_()
            for norm in (layer.self_attn_layer_norm, layer.encoder_attn_text_layer_norm,
                         layer.encoder_attn_layer_norm, layer.final_layer_norm):
                norm.weight.fill_(1.0)
                norm.bias.zero_()
        decoder.layer_norm.weight.fill_(1.0)
        decoder.layer_norm.bias.zero_()
        queries.copy_(other.expand(count, -1))
        queries[chosen] = boxing
        # a LayerNorm of a zero-mean unit vector is that vector times sqrt(d): h_q = sqrt(d) * direction
        passing, blocked = REALISTIC_LOGITS
        text_norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
        text_norm.weight.fill_(REALISTIC_TEXT_SPREAD)
        text_norm.bias.copy_((passing * boxing + blocked * other) / d**0.5)
    return chosen


def write_standin_weights(out: str | Path, seed: int = 0, parts: tuple[str, ...] = PARTS, arch: str = "real",
                          grounding: str = "realistic") -> dict[str, Path]:
    """Write the chosen stand-in files into `out` (created); returns {part: path}. Same seed, same tensors.
    `grounding`: the Grounding DINO stand-in's kind (`GROUNDING_KINDS`)."""
    if arch not in CLIP_MODELS:
        raise ValueError(f"arch must be one of {sorted(CLIP_MODELS)}, got {arch!r}")
    if grounding not in GROUNDING_KINDS:
        raise ValueError(f"grounding must be one of {', '.join(GROUNDING_KINDS)}, got {grounding!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writers = {"clip": write_clip, "filo": write_filo,
               "grounding": lambda o, s, a: write_grounding(o, s, a, grounding)}
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
