"""FiLo's defining values, torch-free: the backbone it runs, the Grounding DINO it localises with, and the
few-shot matching values measured for it (docs/few-shot.md).

The model's modules take them as their defaults (`clip_backbone`, `references`, `grounding/detector`), and
`service/settings.py` takes its defaults from here without importing torch, so each value is written once.
"""

# the released FiLo code's backbone: open_clip's `ViT-L-14-336` (GELU) with OpenAI's weights, at 518 px
DEFAULT_CLIP_MODEL = "ViT-L-14-336"
DEFAULT_CLIP_WEIGHTS = "openai"
DEFAULT_IMAGE_SIZE = 518
DEFAULT_GROUNDING_MODEL = "IDEA-Research/grounding-dino-tiny"  # hub id of the detector FiLo localises with

# few-shot normal references (models/references.py)
MATCH_MODES = ("position", "global")
DEFAULT_MATCH = "position"
DEFAULT_RADIUS = 0.12  # fraction of the patch grid's side: 4.4 cells of a 37 x 37 grid
DEFAULT_WEIGHT = 0.75  # few-shot share of the fused map and score (measured, docs/few-shot.md)
