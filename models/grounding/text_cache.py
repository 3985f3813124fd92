"""A memo for Grounding DINO's text pass: BERT runs once per caption, not once per batch.

FiLo's caption (general words and a category's descriptions) is the same for every image of a category,
so the text backbone's output is the same for every batch. ``GroundingDinoModel.forward`` always calls
``self.text_backbone(input_ids, text_self_attention_masks, token_type_ids, position_ids, return_dict=...)``
and offers no argument for precomputed text features, so the memo sits in that call: ``TextPassCache``
replaces the backbone instance's ``forward`` (the module and its weights stay where they are, so
``state_dict``, ``save_pretrained`` and ``.to()`` see the plain model) and, when all rows of the batch are
the same text, runs the backbone on one row, keeps its ``last_hidden_state`` and hands out a copy expanded
to the batch. Anything else (rows that differ, gradients on, training mode, extra outputs asked for)
goes to the backbone's own forward untouched.

Exactness: the kept row is what a one-row pass gives, and the uncached model runs the same row B times in
one pass. Both are the same arithmetic as long as the backbone computes each row independently of the
batch size, which holds bit for bit on the CPU (fp32 and bf16 autocast: ``tests/test_grounding.py``).
On CUDA, matrix-product kernels may be chosen by batch shape and round differently in the last bit: see
docs/gpu.md ("Speed options") for what has been checked there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.lru import LRUDict


class TextPassCache:
    """Memoises ``backbone``'s forward by its inputs, for at most ``size`` distinct ones (least recently used
    out). The key holds the input ids, the attention mask, the token types and the position ids of one row,
    the device, the autocast state and every weight's identity and version, so a changed caption, a moved
    model or updated weights never hit a stale entry. ``install`` / ``uninstall`` put it in and take it out.
    """

    def __init__(self, backbone: nn.Module, size: int = 8) -> None:
        self.backbone = backbone
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: LRUDict[tuple, tuple[type, torch.Tensor]] = LRUDict(size)
        self._forward = None

    # ----- installing -----

    def install(self) -> TextPassCache:
        """Route ``backbone(...)`` through the memo (idempotent)."""
        if self._forward is None:
            self._forward = self.backbone.forward
            self.backbone.forward = self
        return self

    def uninstall(self, clear: bool = True) -> None:
        """Back to the backbone's own forward; the kept entries are dropped unless ``clear`` is False."""
        if self._forward is not None:
            del self.backbone.forward  # the instance attribute: the class's forward shows again
            self._forward = None
        if clear:
            self.clear()

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # ----- the call -----

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *args: Any,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        if self._forward is None:
            raise RuntimeError("TextPassCache called while not installed")
        forward = self._forward
        inputs = (input_ids, attention_mask, token_type_ids, position_ids)
        key = None
        if not (
            args
            or any(v is not None and v is not False for v in kwargs.values())
            or any(t is None for t in inputs)
            or torch.is_grad_enabled()
            or self.backbone.training
        ):
            key = self._key(inputs)  # None when the rows differ
        if key is None:
            return forward(input_ids, attention_mask, token_type_ids, position_ids, *args, return_dict=return_dict,
                           **kwargs)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            out = forward(*(t[:1] for t in inputs), return_dict=True)
            entry = (type(out), out.last_hidden_state.detach())
            self._entries[key] = entry
        else:
            self.hits += 1
        output_type, hidden = entry
        hidden = hidden.expand(input_ids.shape[0], *hidden.shape[1:]).clone()  # the caller's own tensor
        if return_dict is False:
            return (hidden,)
        return output_type(last_hidden_state=hidden)

    def _key(self, inputs: tuple[torch.Tensor, ...]) -> tuple | None:
        """The memo key of one row of ``inputs``, or None when the rows of the batch differ.

        One host transfer: whether all rows are equal, and the first row of every input.
        """
        same = torch.stack([(t == t[:1]).all() for t in inputs]).all().reshape(1).long()
        host = torch.cat([same] + [t[0].reshape(-1).long() for t in inputs]).cpu()
        if not bool(host[0]):
            return None
        device = inputs[0].device
        autocast = torch.is_autocast_enabled(device.type)
        return (
            tuple((tuple(t.shape[1:]), t.dtype) for t in inputs),
            host[1:].numpy().tobytes(),
            str(device),
            (autocast, torch.get_autocast_dtype(device.type) if autocast else None),
            tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.backbone.parameters()),
        )
