"""Which results keep their artefacts (the uploaded image and the heatmap), per `FILO_RECORDS_KEEP`."""

from __future__ import annotations

import random
from collections.abc import Callable


def keeps_artefacts(keep: str, ok_sample: float, is_anomalous: bool,
                    draw: Callable[[], float] = random.random) -> bool:
    """`all`: every result; `none`: no result; `ng`: NG results, and a sampled `ok_sample` share of OK ones
    (so the normal look of a line stays on file for later calibration and audits)."""
    if keep == "all":
        return True
    if keep == "none":
        return False
    return is_anomalous or draw() < ok_sample


def might_keep(keep: str) -> bool:
    """Whether any result could keep artefacts: then the heatmap is rendered even when the client asked none."""
    return keep != "none"
