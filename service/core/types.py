"""Plain data that crosses the boundary between the service and the inspection pipeline.

Kept free of torch so that the API process (which never runs a model) can import it cheaply.
Coordinates named `*_frame` are pixels of the model's square input frame (518x518 by default);
the others are pixels of the original image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class InspectRequest:
    """One image to inspect. `image` is the decoded original, HxWx3 uint8 RGB."""

    image: np.ndarray
    category: str
    top_k: int = 5
    grounding: bool | None = None  # None: the engine's default
    position: str | None = None  # force a position (one of the nine); skips Grounding DINO's choice
    boxes_frame: list[tuple[float, float, float, float]] | None = None  # given boxes, x1 <= x < x2
    pixels: Any = None  # the model input, set by `InspectionEngine.prepare` ahead of the batch; None: not yet
    grounding_pixels: Any = None  # Grounding DINO's input, likewise (only when grounding will run)
    references: Any = None  # a models.references.ReferenceMemory for this image; None: the category's own (if any)


@dataclass
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    phrase: str
    confidence: float
    valid: bool  # the phrase names an anomaly word; only valid boxes steer position and suppression
    frame: tuple[float, float, float, float]  # the same box in the model frame


@dataclass
class AnomalyType:
    description: str
    similarity: float


@dataclass
class InspectResult:
    score: float
    text_score: float  # text_probs[abnormal]
    map_max: float  # max of the map before suppression
    anomaly_map: np.ndarray  # float32 (S, S), model frame, after suppression
    position: str | None  # None: all nine positions averaged
    boxes: list[Box] = field(default_factory=list)
    top_types: list[AnomalyType] = field(default_factory=list)
    timing_ms: dict[str, float] = field(default_factory=dict)
    references: int = 0  # normal reference images fused into this result (0: zero-shot)
    # the verdict, decided once by the engine with the category's rule (service/catalog/thresholds.py)
    threshold: float | None = None  # None: no rule applied (a result not from the engine)
    threshold_source: str = "default"  # default | references | labelled | learned | manual
    review_margin: float = 0.0
    is_anomalous: bool = False
    needs_review: bool = False

    def summary(self) -> dict:
        """JSON-friendly view without the map."""
        return {
            "score": self.score,
            "position": self.position,
            "boxes": [asdict(b) for b in self.boxes],
            "top_types": [asdict(t) for t in self.top_types],
            "timing_ms": self.timing_ms,
        }


class InspectError(Exception):
    """A request that failed on its own (bad category, model crash on this image); never its batch."""

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
