"""The backbone's MLP activation: GELU by default (what the released code runs), recorded and checked.

The OpenAI ViT-L/14@336 weights were trained with QuickGELU, but the released FiLo factory builds them
into open_clip's plain `ViT-L-14-336` config (GELU) and the published checkpoints were trained on that
(spec section 1). GELU vs QuickGELU is the same weights and shapes, so only metadata can tell them apart.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, save_checkpoint
from models.clip_backbone import (
    DEFAULT_CLIP_MODEL,
    TINY_CLIP_MODEL,
    BackboneSpec,
    _note_deliberate_activation,
    built_activation,
    config_activation,
    create_clip,
)
from models.errors import CheckpointError
from models.factory import ModelSpec, _check_compatible, build_model, checkpoint_activation, demo_spec
from service.settings import FiloSettings
from tests.conftest import random_heads, synthetic_image
from tests.service_fixtures import REPO, worker_env


def test_default_backbone_is_the_released_gelu_one():
    assert DEFAULT_CLIP_MODEL == "ViT-L-14-336"
    assert ModelSpec().clip_model == FiloSettings().clip_model == DEFAULT_CLIP_MODEL
    assert config_activation(DEFAULT_CLIP_MODEL) == "gelu"
    assert config_activation("ViT-L-14-336-quickgelu") == "quickgelu"
    # the name's config decides, and the built module really is that activation
    clip = open_clip.create_model(DEFAULT_CLIP_MODEL, pretrained=None)
    assert built_activation(clip) == "gelu" and isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    # the tiny demo model keeps the activation its bundled heads were trained with (QuickGELU)
    assert config_activation(TINY_CLIP_MODEL) == "quickgelu"
    assert built_activation(create_clip(BackboneSpec(TINY_CLIP_MODEL, None, 224))) == "quickgelu"


def test_open_clips_mismatch_warning_becomes_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="models.clip_backbone"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _note_deliberate_activation(DEFAULT_CLIP_MODEL, "openai")
        warnings.warn("QuickGELU mismatch between final model config (quick_gelu=False) and pretrained tag "
                      "'openai' (quick_gelu=True).", UserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another warning"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "GELU" in lines[0] and "deliberate" in lines[0] and "released FiLo" in lines[0]
    caplog.clear()
    _note_deliberate_activation("ViT-L-14-336-quickgelu", "openai")  # no mismatch: nothing to say
    assert not caplog.records


def test_project_checkpoint_records_activation_and_refuses_the_other(tmp_path, tiny_clip):
    heads = random_heads(tiny_clip)
    path = save_checkpoint(tmp_path / "q.safetensors", heads,
                           {"clip_model": TINY_CLIP_MODEL, "image_size": 518, "tap_layout": "released",
                            "activation": "gelu"})
    _, meta = load_checkpoint(path)
    assert meta["activation"] == "gelu"
    with pytest.raises(CheckpointError) as err:
        build_model(demo_spec(checkpoint=str(path)))  # the tiny backbone is QuickGELU
    msg = str(err.value)
    assert "trained with the GELU activation" in msg and "builds QUICKGELU" in msg
    assert "--allow-activation-mismatch" in msg
    model, info = build_model(demo_spec(checkpoint=str(path), allow_activation_mismatch=True))
    assert info["activation"] == "quickgelu"
    assert torch.equal(model.heads.adapter.fc[0].weight, heads.adapter.fc[0].weight)
    # without an explicit record the backbone's config decides; an unknown value is refused at save time
    auto = save_checkpoint(tmp_path / "g.safetensors", heads,
                           {"clip_model": TINY_CLIP_MODEL, "image_size": 518, "tap_layout": "released"})
    assert load_checkpoint(auto)[1]["activation"] == "quickgelu"
    build_model(demo_spec(checkpoint=str(auto)))
    with pytest.raises(ValueError, match="activation"):
        save_checkpoint(tmp_path / "x.safetensors", heads, {"clip_model": TINY_CLIP_MODEL, "image_size": 518,
                                                            "tap_layout": "released", "activation": "relu"})


def test_official_pth_is_taken_as_gelu(tmp_path, tiny_clip):
    heads = random_heads(tiny_clip)
    path = tmp_path / "official.pth"
    torch.save({"filo": {**heads.state_dict(), "clip_model.logit_scale": torch.tensor(1.0)}}, path)
    _, meta = load_checkpoint(path)
    assert meta["format"] == "official" and meta["activation"] == "gelu"
    assert checkpoint_activation({"format": "official"}) == "gelu"
    assert checkpoint_activation({"clip_model": "ViT-L-14-336-quickgelu"}) == "quickgelu"
    _check_compatible(ModelSpec(checkpoint=str(path)), meta)  # the default backbone is GELU: accepted
    with pytest.raises(CheckpointError, match="GELU activation but the backbone 'ViT-L-14-336-quickgelu'"):
        build_model(ModelSpec(clip_model="ViT-L-14-336-quickgelu", clip_weights="openai", checkpoint=str(path)))
    _check_compatible(ModelSpec(clip_model="ViT-L-14-336-quickgelu", checkpoint=str(path),
                                allow_activation_mismatch=True), meta)
    with pytest.raises(CheckpointError, match="builds QUICKGELU"):  # the tiny demo backbone too
        build_model(demo_spec(checkpoint=str(path)))


def test_allow_activation_mismatch_is_a_setting_and_a_flag():
    from service.cli import build_parser
    from service.cli.common import settings_from_args

    assert FiloSettings().allow_activation_mismatch is False
    args = build_parser().parse_args(["inspect", "x.png", "--category", "bottle", "--allow-activation-mismatch"])
    assert settings_from_args(args).allow_activation_mismatch is True
    args = build_parser().parse_args(["inspect", "x.png", "--category", "bottle"])
    assert settings_from_args(args).allow_activation_mismatch is False


@pytest.mark.slow
def test_filo_inspect_default_reproduces_released_code_with_official_checkpoint(tmp_path):
    """`filo inspect` with an official-format checkpoint and no --clip-model: map within 1e-3, score within 1e-4.

    Stand-in weights: a seeded ViT-L/14@336 state dict at its native 336 px (what an open_clip weights file
    holds) and seeded FiLo heads in the official `{"filo": ...}` layout. The reference is the released
    computation on the released factory's build of the same weights (GELU).
    """
    import open_clip

    from descriptions import CategoryCatalog
    from models.clip_backbone import get_tokenizer
    from models.heads import FiLoHeads
    from tests.reference_released import released_clip, released_forward, released_postprocess

    torch.manual_seed(11)
    native = open_clip.create_model("ViT-L-14-336", pretrained=None)
    state = {k: v.half() for k, v in native.state_dict().items()}  # fp16, as OpenAI ships them
    del native
    weights = tmp_path / "vit-l-14-336-standin.pt"
    torch.save(state, weights)
    torch.manual_seed(12)
    heads = FiLoHeads(1024, 768, 768)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ckpt = tmp_path / "filo_official.pth"
    torch.save({"filo": heads.state_dict()}, ckpt)
    image = synthetic_image(400, 400, seed=7)
    img_path = tmp_path / "part.png"
    Image.fromarray(image).save(img_path)
    # whole-pixel box: given boxes cover x1 <= x < x2, which is the released int() slice for integers
    box = (50.0, 60.0, 250.0, 300.0)  # centre (150, 180): the "left" cell
    env = worker_env({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    cmd = [sys.executable, "-m", "service.cli", "inspect", str(img_path), "--category", "candle",
           "--checkpoint", str(ckpt), "--clip-weights", str(weights), "--boxes", ",".join(map(str, box)),
           "--out", str(tmp_path / "out"), "--json", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ours_map = np.load(tmp_path / "out" / "part.npy")

    reference_clip = released_clip({k: v.float() for k, v in state.items()})
    assert built_activation(reference_clip) == "gelu"
    category = CategoryCatalog.load().get("candle")
    from models.clip_backbone import make_preprocess

    pixels = make_preprocess(518)(Image.fromarray(image))[None]
    text_probs, maps = released_forward(reference_clip, get_tokenizer("ViT-L-14-336"), heads, pixels, category.noun,
                                        category.descriptions, ["left"], (6, 12, 18, 24), 518)
    ref_map, ref_score = released_postprocess(text_probs, maps, [box])
    assert result["position"] == "left"
    assert np.abs(ours_map - ref_map).max() < 1e-3
    assert abs(result["score"] - ref_score) < 1e-4
    assert ref_map.std() > 1e-4  # a real map was compared
