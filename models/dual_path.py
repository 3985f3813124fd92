"""FiLo's dual-path (QKV + V-V) image encoder, run over open_clip's own ViT modules.

Nothing of open_clip is copied or patched: each block's own ln_1 / attention projection / MLP
weights are applied (block_ops.py says why not through the block's forward), to one stream up to
the first tap and to two from then on (spec section 2). The V-V stream (softmax(v v^T) v) keeps locality that plain QKV
attention washes out in deep CLIP layers, which is what makes patch-level maps possible.

Tap layouts (spec section 2): "paper" is what the paper describes; "released" reproduces the
aliasing of the released code's in-place updates, which the published checkpoints were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.block_ops import check_block, finish_block, merge_heads, run_block, split_heads

TapLayout = Literal["released", "paper"]
TAP_LAYOUTS: tuple[str, ...] = ("released", "paper")


@dataclass
class EncoderOutput:
    """global_feature: (B, E) CLS after ln_post @ proj. qkv: 4 x (B, 1+N, W). vv: 3 x (B, 1+N, W).

    stream: 4 x (B, 1+N, W), the standard stream's raw tokens right after each tap block (the same
    tensors the taps are made of, no extra work): what few-shot reference memories match
    (models/references.py), independent of the tap layout and of the heads.
    """

    global_feature: torch.Tensor
    qkv: list[torch.Tensor]
    vv: list[torch.Tensor]
    stream: list[torch.Tensor] = field(default_factory=list)


def default_taps(layers: int) -> tuple[int, int, int, int]:
    """Quarter points of the depth: (6, 12, 18, 24) for ViT-L's 24 blocks."""
    if layers % 4:
        raise ValueError(f"the dual-path encoder needs a depth divisible by 4, got {layers}")
    q = layers // 4
    return (q, 2 * q, 3 * q, layers)


class DualPathEncoder(nn.Module):
    """Wraps an open_clip `VisionTransformer` (frozen) and produces FiLo's 7 feature maps."""

    def __init__(self, visual: nn.Module, tap_layout: TapLayout = "released"):
        super().__init__()
        if tap_layout not in TAP_LAYOUTS:
            raise ValueError(f"tap_layout must be one of {TAP_LAYOUTS}, got {tap_layout!r}")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("FiLo needs a plain CLS-token ViT (no attentional pooling)")
        self.visual = visual
        self.tap_layout = tap_layout
        self.taps = default_taps(len(visual.transformer.resblocks))

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def grid(self) -> int:
        return self.visual.grid_size[0]

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """images: (B, 3, S, S) normalised. Returns the global feature and the tapped token maps."""
        visual = self.visual
        x = visual._embeds(images)
        blocks = visual.transformer.resblocks
        first = self.taps[0]
        for blk in blocks[:first]:
            x = run_block(blk, x)
        s, v = x, x
        s_taps: dict[int, torch.Tensor] = {first: x}
        v_taps: dict[int, torch.Tensor] = {}
        attn_after: dict[int, torch.Tensor] = {}
        for idx in range(first + 1, len(blocks) + 1):
            blk = blocks[idx - 1]
            a_std, a_vv = _dual_attention(blk, blk.ln_1(s))
            if (idx - 1) in self.taps:
                attn_after[idx - 1] = a_std  # the released code's tap after block idx-1 absorbed this
            s = finish_block(blk, s, a_std)
            v = v + a_vv
            if idx in self.taps:
                s_taps[idx] = s
                v_taps[idx] = v
        t1, t2, t3, t4 = self.taps
        if self.tap_layout == "paper":
            qkv = [s_taps[t1], s_taps[t2], s_taps[t3], s_taps[t4]]
            vv = [v_taps[t2], v_taps[t3], v_taps[t4]]
        else:
            v_final = v_taps[t4]
            qkv = [v_final, s_taps[t2] + attn_after[t2], s_taps[t3] + attn_after[t3], s_taps[t4]]
            vv = [v_final, v_final, v_final]
        pooled = visual.ln_post(s[:, 0])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return EncoderOutput(global_feature=pooled, qkv=qkv, vv=vv, stream=[s_taps[t] for t in self.taps])


def _dual_attention(blk: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both attentions of one block on h = ln_1(s): (Proj(softmax(qk^T)v), Proj(softmax(vv^T)v))."""
    attn = check_block(blk)
    b = h.shape[0]
    q, k, v = split_heads(attn, h)
    std = F.scaled_dot_product_attention(q, k, v)
    vv = F.scaled_dot_product_attention(v, v, v)
    out = merge_heads(attn, torch.cat([std, vv], dim=0))
    return out[:b], out[b:]
