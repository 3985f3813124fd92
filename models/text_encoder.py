"""CLIP's text tower fed with token embeddings instead of token ids (for learned context).

Reuses open_clip's modules (positional table, causal transformer, ln_final, projection). Because
the attention is causal, a sequence may be cut after its EOT token without changing the EOT
feature; `PromptBank` stores sequences cut after the longest EOT of the category.

Causality also means the hidden states of a shared prefix do not depend on what follows it. All of
an image's sentences start with the same SOT + 12 context vectors, so `forward_shared_prefix` runs
that prefix once per image and state and lets every sentence's own tokens attend to its keys and
values: about half the text FLOPs (569 -> 300 GFLOP per ViT-L image with all nine positions), same
features (tests/ compare it with `forward`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.block_ops import check_block, finish_block, merge_heads, split_heads


class PromptTextEncoder(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.transformer = clip.transformer
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)

    @property
    def token_dim(self) -> int:
        return self.positional_embedding.shape[1]

    def forward(self, embeddings: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """embeddings: (S, L, D) token embeddings (L <= context length); eot: (S,) -> (S, E), not normalised."""
        length = embeddings.shape[1]
        x = embeddings + self.positional_embedding[:length].to(embeddings.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        return self._project(self.ln_final(x), eot)

    def _project(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Each sequence's EOT feature through the text projection (a Linear or a matrix)."""
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    def forward_shared_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor, group: torch.Tensor,
                              eot: torch.Tensor) -> torch.Tensor:
        """The same features as `forward(cat([prefix[group], suffix], 1), eot)`, the prefix run once.

        prefix: (G, P, D) token embeddings shared by groups of sentences; suffix: (S, L, D) each
        sentence's remaining tokens (padded after its EOT); group: (S,) which prefix each sentence
        starts with; eot: (S,) EOT positions in the full sequence (>= P) -> (S, E).
        """
        n_pre, n_suf = prefix.shape[1], suffix.shape[1]
        pos = self.positional_embedding[: n_pre + n_suf]
        xp = prefix + pos[:n_pre].to(prefix.dtype)
        xs = suffix + pos[n_pre:].to(suffix.dtype)
        # suffix token i sees the whole prefix and suffix tokens <= i
        ones = torch.ones(n_suf, n_suf, dtype=torch.bool, device=suffix.device)
        mask = torch.cat([ones[:, :1].expand(n_suf, n_pre), ones.tril()], dim=1)
        for blk in self.transformer.resblocks:
            xp, xs = _shared_prefix_block(blk, xp, xs, group, mask)
        return self._project(self.ln_final(xs), eot - n_pre)


def _shared_prefix_block(blk: nn.Module, xp: torch.Tensor, xs: torch.Tensor, group: torch.Tensor,
                         mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One open_clip residual block, prefix (causal on its own) and suffixes (attending to both)."""
    attn = check_block(blk)
    qp, kp, vp = split_heads(attn, blk.ln_1(xp))
    qs, ks, vs = split_heads(attn, blk.ln_1(xs))
    ap = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    a_s = F.scaled_dot_product_attention(qs, torch.cat([kp[group], ks], dim=2), torch.cat([vp[group], vs], dim=2),
                                         attn_mask=mask)
    return finish_block(blk, xp, merge_heads(attn, ap)), finish_block(blk, xs, merge_heads(attn, a_s))
