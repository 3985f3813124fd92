"""The production path against a literal re-statement of the released FiLo code (tests/reference_released.py).

This is the check behind "published checkpoints give the published numbers": same weights in,
same map (every pixel) and score out, for every position mode and with box suppression.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from descriptions import CategoryCatalog
from models import anomaly_maps as am
from models.clip_backbone import make_preprocess
from models.grounding.hqloc import suppression_keep_mask
from tests.conftest import random_heads, synthetic_image
from tests.reference_released import released_forward, released_postprocess

CATALOG = CategoryCatalog.load()


def _ours(model, pixels, category, position, boxes):
    bank = model.prompt_bank(category.noun, category.descriptions)
    with torch.no_grad():
        out = model(pixels, [bank], [position])
    m = out.anomaly_map[0]
    keep = suppression_keep_mask(np.asarray(boxes, float).reshape(-1, 4), m.shape[0], semantics="released")
    score = float(am.image_score(out.text_probs[0, 1], m.max()))
    return am.suppress(m, keep).numpy(), score, out


@pytest.mark.parametrize("position, boxes", [
    (None, []),
    ("top left", [(10.4, 20.9, 200.2, 150.7)]),
    ("center", [(100.0, 100.0, 300.0, 300.0), (400.5, 10.2, 517.9, 90.0)]),
    ("bottom right", [(-5.0, 30.0, 100.0, 120.0)]),  # overflows the left edge: the released slice is empty
])
def test_tiny_model_matches_released_code(tiny_model, tiny_clip, tiny_tokenizer, position, boxes):
    category = CATALOG.get("pcb1")
    image = synthetic_image(300, 420, seed=3)
    pixels = make_preprocess(518)(Image.fromarray(image))[None]
    ours_map, ours_score, out = _ours(tiny_model, pixels, category, position, boxes)
    text_probs, maps = released_forward(tiny_clip, tiny_tokenizer, tiny_model.heads, pixels, category.noun,
                                        category.descriptions, [position] if position else [], (2, 4, 6, 8), 518)
    ref_map, ref_score = released_postprocess(text_probs, maps, boxes)
    assert torch.allclose(out.text_probs[0], text_probs, atol=1e-6)
    np.testing.assert_allclose(ours_map, ref_map, atol=1e-5, rtol=0)
    assert abs(ours_score - ref_score) < 1e-6
    # the maps are not degenerate: the comparison above compared real structure
    assert ref_map.std() > 1e-4


def test_paper_layout_matches_unaliased_taps(tiny_clip, tiny_tokenizer):
    from models.filo import FiLoModel

    model = FiLoModel(tiny_clip, tiny_tokenizer, random_heads(tiny_clip, seed=5), 518, "paper").eval()
    category = CATALOG.get("carpet")
    pixels = make_preprocess(518)(Image.fromarray(synthetic_image(256, 256, seed=1)))[None]
    ours_map, ours_score, _ = _ours(model, pixels, category, None, [])
    text_probs, maps = released_forward(tiny_clip, tiny_tokenizer, model.heads, pixels, category.noun,
                                        category.descriptions, [], (2, 4, 6, 8), 518, clone_taps=True)
    ref_map, ref_score = released_postprocess(text_probs, maps, [])
    np.testing.assert_allclose(ours_map, ref_map, atol=1e-5, rtol=0)
    assert abs(ours_score - ref_score) < 1e-6
    # and the two layouts really differ, so the default matters
    released = FiLoModel(tiny_clip, tiny_tokenizer, model.heads, 518, "released").eval()
    rel_map, _, _ = _ours(released, pixels, category, None, [])
    assert np.abs(rel_map - ours_map).max() > 1e-3


@pytest.mark.slow
def test_full_size_vit_l_architecture_matches_released_code():
    """ViT-L/14@336 at 518 with random weights: real widths, 24 blocks, taps 6/12/18/24, 1370 tokens.

    The default backbone (no model name given) against the released factory's own build of the same
    state dict (plain config, so GELU; plain-bicubic grid resize): activation, grid and computation at once.
    """
    import open_clip

    from models.clip_backbone import DEFAULT_CLIP_MODEL, built_activation, get_tokenizer, set_input_size
    from models.filo import FiLoModel
    from tests.reference_released import released_clip

    torch.manual_seed(0)
    clip = open_clip.create_model(DEFAULT_CLIP_MODEL, pretrained=None).eval().requires_grad_(False)
    reference_clip = released_clip(clip.state_dict())
    set_input_size(clip, 518)
    assert clip.visual.positional_embedding.shape == (1370, 1024)
    assert built_activation(clip) == built_activation(reference_clip) == "gelu"
    heads = random_heads(clip, seed=2, scale=0.2)
    tokenizer = get_tokenizer(DEFAULT_CLIP_MODEL)
    model = FiLoModel(clip, tokenizer, heads, 518, "released").eval()
    category = CATALOG.get("candle")
    pixels = make_preprocess(518)(Image.fromarray(synthetic_image(400, 400, seed=7)))[None]
    boxes = [(50.0, 60.0, 250.5, 300.2)]
    ours_map, ours_score, _ = _ours(model, pixels, category, "top", boxes)
    del clip, model
    text_probs, maps = released_forward(reference_clip, tokenizer, heads, pixels, category.noun,
                                        category.descriptions, ["top"], (6, 12, 18, 24), 518)
    ref_map, ref_score = released_postprocess(text_probs, maps, boxes)
    np.testing.assert_allclose(ours_map, ref_map, atol=1e-4, rtol=0)
    assert abs(ours_score - ref_score) < 1e-5
