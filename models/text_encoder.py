"""CLIP's text tower fed with token embeddings instead of token ids (for learned context).

Reuses open_clip's modules (positional table, causal transformer, ln_final, projection). Because
the attention is causal, a sequence may be cut after its EOT token without changing the EOT
feature; `PromptBank` stores sequences cut after the longest EOT of the category.
"""

from __future__ import annotations

import torch
import torch.nn as nn


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
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection
