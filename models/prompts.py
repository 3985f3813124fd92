"""FiLo's prompt sentences (spec section 4) and their tokenised, per-category form.

Sentences are data derived from a category's noun and descriptions; the image-dependent part (the
12 context vectors) is spliced in later by the prompt learners. Everything here depends only on
the category, so it is computed once per category and cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
GENERIC_ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


def abnormal_states(descriptions: Sequence[str]) -> list[str]:
    """`abnormal {} with d` for each description, then the five generic states (released order).

    A state is a format string (`{}` takes the noun), so a description's own braces are escaped: they
    stay text, never a placeholder (`{0}`) or a broken format (`}`)."""
    return ["abnormal {} " + f"with {_literal(d)}" for d in descriptions] + list(GENERIC_ABNORMAL_STATES)


def _literal(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def context_placeholder(n_ctx: int) -> str:
    return " ".join(["X"] * n_ctx)


def normal_sentences(noun: str, n_ctx: int = 12) -> list[str]:
    prefix = context_placeholder(n_ctx)
    return [f"{prefix} {state.format(noun)}." for state in NORMAL_STATES]


def abnormal_sentences(noun: str, descriptions: Sequence[str], n_ctx: int = 12) -> list[str]:
    """States outer, the nine positions inner: sentence s*9 + p is state s at position p."""
    prefix = context_placeholder(n_ctx)
    return [
        f"{prefix} {state.format(noun)} at {position}."
        for state in abnormal_states(descriptions)
        for position in POSITIONS
    ]


def position_index(position: str) -> int:
    try:
        return POSITIONS.index(position)
    except ValueError:
        raise ValueError(f"unknown position {position!r}; positions: {', '.join(POSITIONS)}") from None


@dataclass
class PromptBank:
    """One category's sentences as token embeddings with the context slots cut out.

    prefix: (S, 1, D) SOT embedding; suffix: (S, L - 1 - n_ctx, D) the rest, cut after the
    longest EOT (the text transformer is causal, so later tokens never change the EOT feature);
    eot: (S,) EOT positions in the full sequence.
    """

    normal_prefix: torch.Tensor
    normal_suffix: torch.Tensor
    normal_eot: torch.Tensor
    abnormal_prefix: torch.Tensor
    abnormal_suffix: torch.Tensor
    abnormal_eot: torch.Tensor
    n_descriptions: int

    @property
    def n_abnormal_states(self) -> int:
        return self.abnormal_eot.shape[0] // len(POSITIONS)

    def to(self, device: torch.device | str) -> PromptBank:
        return PromptBank(
            *(t.to(device) for t in (
                self.normal_prefix, self.normal_suffix, self.normal_eot,
                self.abnormal_prefix, self.abnormal_suffix, self.abnormal_eot,
            )),
            n_descriptions=self.n_descriptions,
        )

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for persisting the cache (safetensors)."""
        return {
            "normal_prefix": self.normal_prefix, "normal_suffix": self.normal_suffix,
            "normal_eot": self.normal_eot, "abnormal_prefix": self.abnormal_prefix,
            "abnormal_suffix": self.abnormal_suffix, "abnormal_eot": self.abnormal_eot,
            "n_descriptions": torch.tensor(self.n_descriptions),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> PromptBank:
        return cls(
            t["normal_prefix"], t["normal_suffix"], t["normal_eot"],
            t["abnormal_prefix"], t["abnormal_suffix"], t["abnormal_eot"],
            int(t["n_descriptions"]),
        )


def _tokens_to_parts(tokens: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], n_ctx: int,
                     truncate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    eot = tokens.argmax(dim=-1)  # the EOT token has the largest id in CLIP's vocabulary
    length = int(eot.max()) + 1 if truncate else tokens.shape[1]
    weight = getattr(embed, "weight", None)  # the tokenizer gives host tensors; the embedding may be on a GPU
    with torch.no_grad():
        emb = embed(tokens[:, :length].to(weight.device if weight is not None else tokens.device))
    return emb[:, :1], emb[:, 1 + n_ctx:], eot  # eot stays on the host until checked


def build_prompt_bank(noun: str, descriptions: Sequence[str], tokenizer: Callable, embed: Callable,
                      n_ctx: int = 12, truncate: bool = True) -> PromptBank:
    """Tokenise a category's sentences and embed them with CLIP's token embedding."""
    normal_tokens = tokenizer(normal_sentences(noun, n_ctx))
    abnormal_tokens = tokenizer(abnormal_sentences(noun, descriptions, n_ctx))
    n_pre, n_suf, n_eot = _tokens_to_parts(normal_tokens, embed, n_ctx, truncate)
    a_pre, a_suf, a_eot = _tokens_to_parts(abnormal_tokens, embed, n_ctx, truncate)
    if int(n_eot.min()) <= n_ctx or int(a_eot.min()) <= n_ctx:
        raise ValueError("a prompt sentence was cut before its context tokens; descriptions too long?")
    return PromptBank(n_pre, n_suf, n_eot.to(n_pre.device), a_pre, a_suf, a_eot.to(a_pre.device), len(descriptions))
