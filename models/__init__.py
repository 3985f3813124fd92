"""FiLo as tensors in, tensors out: backbone, dual-path encoder, heads, prompts, maps, score; Grounding DINO
and the HQ-Loc rules (`grounding/`).

The network and its weights only: nothing here reads requests, encodes images, reads datasets or trains
(`filo_lab/` does the offline work, `service/` the serving), and nothing imports another package of this
repository (tests/test_imports.py). Files are touched only to load weights: `checkpoint.py`,
`clip_backbone.py`, `grounding/detector.py`, `standin.py`.
"""
