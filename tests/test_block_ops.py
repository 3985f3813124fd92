"""Our application of open_clip's blocks (block_ops, the shared-prefix text path) against open_clip's own."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from descriptions import CategoryCatalog
from models import anomaly_maps as am
from models.block_ops import run_block

CATALOG = CategoryCatalog.load()


def test_run_block_equals_open_clip_block(tiny_clip):
    torch.manual_seed(0)
    vis_blk = tiny_clip.visual.transformer.resblocks[0]
    x = torch.randn(3, 50, vis_blk.ln_1.normalized_shape[0])
    with torch.no_grad():
        torch.testing.assert_close(run_block(vis_blk, x), vis_blk(x), atol=1e-5, rtol=0)
    txt_blk = tiny_clip.transformer.resblocks[1]
    t = torch.randn(4, 20, txt_blk.ln_1.normalized_shape[0])
    causal = tiny_clip.attn_mask[:20, :20]
    with torch.no_grad():
        torch.testing.assert_close(run_block(txt_blk, t, is_causal=True), txt_blk(t, attn_mask=causal),
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(run_block(txt_blk, t), txt_blk(t, attn_mask=causal), atol=1e-3)


class _ShapeLog(TorchDispatchMode):
    """Records the shape of every op's output."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append((str(func), tuple(out.shape)))
        return out


def test_bf16_encoder_never_copies_the_projection_per_token(tiny_model):
    """nn.MultiheadAttention under autocast, batch > 1, expands its (W, 3W) weight once per token.

    That was a 20x slowdown of the real model at batch 2 on CPU; the encoder must not do it.
    """
    m = tiny_model
    width = m.encoder.width
    images = torch.randn(2, 3, m.image_size, m.image_size)
    m.precision = "bf16"
    try:
        with _ShapeLog() as log:
            m.encode_images(images)
    finally:
        m.precision = "fp32"
    expanded = [(f, s) for f, s in log.shapes if len(s) == 3 and s[1:] == (width, 3 * width) and s[0] > 1]
    assert not expanded, expanded[:3]
    assert any(s[-1] == 3 * width for _, s in log.shapes)  # the projections did run through this log


@pytest.mark.parametrize("positions", [[None, "right", None], ["top left", "center", "bottom"]])
def test_shared_prefix_text_features_equal_full_sequences(tiny_model, positions):
    m = tiny_model
    cats = [CATALOG.get(n) for n in ("zipper", "pcb1", "screw")]
    banks = [m.prompt_bank(c.noun, c.descriptions) for c in cats]
    torch.manual_seed(3)
    img = am.normalize(torch.randn(3, m.clip.text_projection.shape[1]))
    with torch.no_grad():
        m.shared_text_prefix = False
        plain_t, plain_sims = m.text_features(img, banks, positions)
        m.shared_text_prefix = True
        shared_t, shared_sims = m.text_features(img, banks, positions)
    torch.testing.assert_close(shared_t, plain_t, atol=2e-6, rtol=0)
    for a, b in zip(shared_sims, plain_sims):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    assert not torch.allclose(shared_t[0], shared_t[1], atol=1e-3)  # the comparison is not vacuous


def test_shared_prefix_gradients_equal_full_sequences(tiny_model):
    """Training goes through the shared path too: the context vectors must get the same gradients."""
    m = tiny_model
    cat = CATALOG.get("bottle")
    bank = m.prompt_bank(cat.noun, cat.descriptions)
    img = am.normalize(torch.randn(2, m.clip.text_projection.shape[1]))
    learners = (m.heads.normal_prompt_learner, m.heads.abnormal_prompt_learner)
    grads = []
    for shared in (False, True):
        m.shared_text_prefix = shared
        for p in m.heads.parameters():
            p.grad = None
        text, _ = m.text_features(img, [bank, bank], [None, "left"])
        (text[:, 1] * torch.linspace(-1, 1, text.shape[-1])).sum().backward()
        grads.append([p.grad.clone() for lr in learners for p in lr.parameters()])
    m.shared_text_prefix = True
    for p in m.heads.parameters():
        p.grad = None
    for a, b in zip(*grads):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
