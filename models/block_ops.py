"""open_clip residual blocks applied with their own weights, outside `nn.MultiheadAttention`.

Why not call the block: under autocast `nn.MultiheadAttention` leaves its fast path and projects
a sequence-first, non-contiguous view, for which `torch.matmul` cannot fold the batch and instead
copies the (W, 3W) in-projection once per token (8.6 GB per ViT-L block at 1370 tokens, batch 2 in
bf16; a 20x slowdown on CPU, and pure memory traffic on GPU). Projecting the batch-first tensor with
`F.linear` and attending with `scaled_dot_product_attention` is the same computation without it,
and lets SDPA pick flash / memory-efficient kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_block(blk: nn.Module) -> nn.MultiheadAttention:
    """The block's attention, if it is open_clip's packed self-attention (the only kind handled)."""
    attn = blk.attn
    if (not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim
            or attn.in_proj_weight is None or hasattr(blk, "ln_1_kv")):
        raise ValueError("expected open_clip's packed nn.MultiheadAttention self-attention")
    return attn


def split_heads(attn: nn.MultiheadAttention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (B, L, W) already layer-normed -> q, k, v, each (B, heads, L, W / heads)."""
    b, length, w = h.shape
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(b, length, 3, attn.num_heads, w // attn.num_heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(attn: nn.MultiheadAttention, a: torch.Tensor) -> torch.Tensor:
    """a (B, heads, L, d) -> out_proj of (B, L, heads * d)."""
    b, heads, length, d = a.shape
    return F.linear(a.transpose(1, 2).reshape(b, length, heads * d), attn.out_proj.weight, attn.out_proj.bias)


def finish_block(blk: nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a pre-norm block once its attention output is known: both residuals and the MLP."""
    x = x + blk.ls_1(attended)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def run_block(blk: nn.Module, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    """`blk(x)` (bidirectional) or `blk(x, attn_mask=causal)`, batch-first (B, L, W)."""
    attn = check_block(blk)
    q, k, v = split_heads(attn, blk.ln_1(x))
    return finish_block(blk, x, merge_heads(attn, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)))
