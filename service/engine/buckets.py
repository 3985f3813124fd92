"""Batch-size buckets for the image encoder, so that a compiled (and CUDA-graphed) encoder sees few shapes.

A worker's batches come in every size from 1 to ``max_batch_size``. ``torch.compile`` specialises on the
batch size, and a CUDA graph is recorded per shape, so each new size would compile (tens of seconds on a
GPU) and record again. Padding the batch with blank images up to the next power of two bounds that to
log2(max) + 1 shapes, all compiled and recorded during warm-up. The encoder handles every image of a
batch on its own (a ViT has no batch-wide operation), so the padded images change nothing in the others:
the real images' outputs are sliced back out, equal to the unpadded run (tests/test_speed_options.py).

With CUDA graphs (``torch.compile(mode="reduce-overhead")``) the outputs live in the graph's static
buffers, which the next replay overwrites; they are copied out before anything else runs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.dual_path import EncoderOutput


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself: 1, 2, 4, 8, 12 for 12."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch_size)
    return tuple(sizes)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` images; ``n`` itself past the largest (then it runs as it is)."""
    return next((b for b in buckets if b >= n), n)


class BucketedEncoder(nn.Module):
    """Runs ``inner`` (the dual-path encoder, usually compiled) on batches padded to a bucket size."""

    def __init__(self, inner: nn.Module, buckets: Sequence[int], cuda_graphs: bool = False):
        super().__init__()
        self.inner = inner
        self.buckets = tuple(sorted(set(buckets)))
        self.cuda_graphs = cuda_graphs

    @property
    def tap_layout(self) -> str:
        return self.inner.tap_layout

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        n = images.shape[0]
        size = bucket_for(n, self.buckets)
        if size > n:
            images = torch.cat([images, images.new_zeros((size - n, *images.shape[1:]))])
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the previous replay's outputs are done
        out = self.inner(images)
        if size == n and not self.cuda_graphs:
            return out
        # graphed outputs are the graph's buffers: copy them out (sliced or not) before the next replay
        take = (lambda t: t[:n].clone()) if self.cuda_graphs else (lambda t: t[:n])
        return EncoderOutput(global_feature=take(out.global_feature), qkv=[take(t) for t in out.qkv],
                             vv=[take(t) for t in out.vv], stream=[take(t) for t in out.stream])
