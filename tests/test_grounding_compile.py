"""FILO_COMPILE_GROUNDING: Grounding DINO compiled as a whole (`models.grounding.detector.compile_whole`),
its graph breaks counted with `torch._dynamo.explain`, and the compiled detector equal to the eager one, on the
CPU with the tiny test model. On CUDA (inductor, bf16): tests/test_cuda.py. The counts are in docs/gpu.md.

Inductor's C++ code generation for the whole tiny model takes minutes on 2 CPU cores (310 s in one run, its
outputs within 1.9e-5 of eager), so the equality here is checked with the "aot_eager" backend: the same
captured graph and decompositions, run without generated code.
"""

from __future__ import annotations

import pytest
import torch

from models.grounding.detector import COMPILE_CONFIG, GroundingDetector
from models.grounding.hqloc import build_caption
from tests.conftest import synthetic_image


@pytest.fixture(scope="module")
def detector() -> GroundingDetector:
    return GroundingDetector.tiny()


def _inputs(detector: GroundingDetector, batch: int = 1, h: int = 120, w: int = 160) -> dict[str, torch.Tensor]:
    caption = detector.encode_caption(build_caption(["scratch", "crack"]))
    pixels = torch.cat([detector.preprocess(synthetic_image(h, w, seed)) for seed in range(batch)])
    return dict(pixel_values=pixels, input_ids=caption.input_ids.expand(batch, -1),
                attention_mask=caption.attention_mask.expand(batch, -1),
                token_type_ids=caption.token_type_ids.expand(batch, -1))


@pytest.mark.slow
def test_the_whole_detector_is_one_graph(detector):
    """Under the detector's compile settings the whole model is one graph: no graph break."""
    with torch.no_grad(), torch._dynamo.config.patch(**COMPILE_CONFIG):
        explained = torch._dynamo.explain(detector.model)(**_inputs(detector))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_without_scalar_capture_only_transformers_shape_check_breaks(detector):
    """Dynamo's defaults break the graph at transformers' shape check in every deformable-attention layer
    (`torch_compilable_check`, an `.item()`), and nowhere else: what COMPILE_CONFIG is for."""
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=False):
        explained = torch._dynamo.explain(detector.model)(**_inputs(detector))
    assert explained.graph_break_count == 14 and explained.graph_count == 15
    assert all("Tensor.item()" in r.reason and r.user_stack[-1].name == "torch_compilable_check"
               for r in explained.break_reasons)


@pytest.mark.slow
def test_the_compiled_detector_equals_eager(detector):
    """Two batch sizes and an image of another size (each shape compiles), compiled against eager."""
    compiled = detector.compiled_view(backend="aot_eager")
    assert compiled.model is detector.model and not detector.compiled
    assert compiled.runtime()["grounding"] == "compiled (aot_eager)" and detector.runtime()["grounding"] == "eager"
    caption = detector.encode_caption(build_caption(["scratch", "crack"]))
    for batch, h, w in ((2, 120, 160), (1, 150, 120)):
        pixels = _inputs(detector, batch, h, w)["pixel_values"]
        want, got = detector.forward_batch(pixels, caption), compiled.forward_batch(pixels, caption)
        assert (got[0] - want[0]).abs().max() <= 1e-5 and (got[1] - want[1]).abs().max() <= 1e-5


def test_the_engine_option_makes_a_compiled_view():
    """EngineOptions.compile_grounding: the engine runs a compiled view over the same model (inductor); the
    detector it was given, and engines built from it without the option, stay eager."""
    from filo_lab.bench.model import build_random_engine

    eager = build_random_engine("tiny", "cpu", grounding=True)
    compiled = eager.with_options(compile_grounding=True)
    assert compiled.detector.compiled == "inductor" and compiled.detector.model is eager.detector.model
    assert eager.detector.compiled is None and compiled.with_options(compile_grounding=False).detector.compiled is None
    assert compiled.runtime()["grounding"] == "compiled"
