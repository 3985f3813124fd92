"""FiLo as tensors in, tensors out: backbone, dual-path encoder, heads, prompts, maps, score.

Nothing in this package reads requests or encodes images; `service/` does that. Checkpoint and
weight loading live in `checkpoint.py` and `clip_backbone.py`, the one place that touches files.
"""
