"""Grounding DINO's stand-ins (filo_lab/standin.py): the realistic one boxes like trained weights (a handful of
queries over the 0.25 box threshold on product-like images), the worst case like the random initialisation
(most queries); both through the production loader. Figures (boxes per image, post-processing time):
`python -m filo_lab.bench.grounding_post --standin`, docs/gpu.md."""

from __future__ import annotations

import pytest
import torch

from filo_lab.bench.grounding_post import boxes_per_image, product_images, standin_detector
from filo_lab.standin import REALISTIC_BOXES, grounding_model, realistic_boxes, write_standin_weights
from models.grounding.detector import GroundingDetector, make_image_processor
from models.standin import read_standin_record
from tests.conftest import synthetic_image


def _images() -> list:
    """Three product-like pictures (synthetic washer, pill, bolt with a defect) and the suite's textured one."""
    return [*product_images(3, (240, 320)), synthetic_image(300, 260, seed=4)]


def test_the_realistic_standin_boxes_a_handful_on_every_image():
    counts = boxes_per_image(standin_detector(kind="realistic", arch="tiny"), _images())
    assert counts == [REALISTIC_BOXES] * 4 and 1 <= REALISTIC_BOXES <= 10


def test_the_worst_case_boxes_most_queries():
    detector = standin_detector(kind="worst-case", arch="tiny")
    queries = detector.model.config.num_queries
    assert all(count > queries // 2 for count in boxes_per_image(detector, _images()))


def test_the_worst_case_is_the_plain_random_initialisation_and_realistic_changes_only_values():
    from transformers import GroundingDinoForObjectDetection

    from models.grounding.detector import load_tiny_config

    worst, realistic = grounding_model(3, "tiny", "worst-case"), grounding_model(3, "tiny", "realistic")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        plain = GroundingDinoForObjectDetection(load_tiny_config())
    assert all(torch.equal(a, b) for a, b in zip(worst.state_dict().values(), plain.state_dict().values(), strict=True))
    shapes = {k: v.shape for k, v in realistic.state_dict().items()}
    assert shapes == {k: v.shape for k, v in worst.state_dict().items()}
    with pytest.raises(ValueError, match="boxes must be between"):
        realistic_boxes(plain, boxes=0)


def test_the_production_loader_reads_the_realistic_standin(tmp_path):
    """`filo standin` writes the realistic kind by default; loaded as real weights are, it boxes the same, and
    its record says which kind it is."""
    paths = write_standin_weights(tmp_path, seed=2, parts=("grounding",), arch="tiny")
    record = read_standin_record(paths["grounding"])
    assert record["boxes"] == "realistic" and f"{REALISTIC_BOXES} queries" in record["boxing"]
    detector = GroundingDetector.from_pretrained(paths["grounding"], local_files_only=True)
    assert detector.standin and boxes_per_image(detector, _images()[:2]) == [REALISTIC_BOXES] * 2
    worst = write_standin_weights(tmp_path / "worst", seed=2, parts=("grounding",), arch="tiny",
                                  grounding="worst-case")
    assert read_standin_record(worst["grounding"])["boxes"] == "worst-case"


@pytest.mark.slow
def test_the_real_architecture_boxes_like_the_tiny_one():
    """grounding-dino-tiny's architecture (900 queries), at a small frame so that the CPU takes seconds (the
    worst case on this architecture: 493 to 694 of 900 at the service's frame, docs/gpu.md)."""
    realistic = standin_detector(kind="realistic")
    realistic.image_processor = make_image_processor(shortest_edge=240, longest_edge=320)  # >= 900 positions
    assert boxes_per_image(realistic, product_images(2, (240, 320))) == [REALISTIC_BOXES] * 2
