"""The project's multi-scale deformable attention kernel (models/grounding/deformable_attention_triton.py)
against transformers' pure-PyTorch path, on the CPU through Triton's interpreter, and the choice of
implementation (models/grounding/deformable_attention.py) for the device a model runs on.

`triton.jit` reads TRITON_INTERPRET when it decorates, and the kernel is decorated on first use for the mode
then in force, so the `interpreter` fixture only has to set the variable. On CUDA the same comparisons run in
tests/test_cuda.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import (
    GroundingDinoConfig,
    GroundingDinoMultiscaleDeformableAttention,
    MultiScaleDeformableAttention,
)

from models.grounding import deformable_attention as msda
from models.grounding.deformable_attention_triton import multi_scale_deformable_attention as triton_msda

# Grounding DINO tiny at the service's input (518 x 518): Swin-T's stages 2-4 at strides 8, 16, 32 and the
# extra level at 64 (tests/test_deformable_attention.py::test_real_spatial_shapes checks them on the model)
REAL_SHAPES = [(65, 65), (33, 33), (17, 17), (9, 9)]
HEADS, HEAD_DIM, POINTS = 8, 32, 4
DECODER_QUERIES = 900
FP32_ATOL = 1e-5
BF16_UNIT = 2.0**-8  # bf16's unit roundoff: 8 significand bits


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _starts(shapes: list[tuple[int, int]]) -> torch.Tensor:
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def _inputs(batch: int, queries: int, shapes: list[tuple[int, int]], heads: int = HEADS, head_dim: int = HEAD_DIM,
            points: int = POINTS, seed: int = 0, spread: float = 0.1):
    """Random value, locations in [-spread, 1 + spread] (some outside the map), softmaxed weights."""
    g = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    seq = sum(h * w for h, w in shapes)
    value = torch.randn(batch, seq, heads, head_dim, generator=g)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=g) * (1 + 2 * spread) - spread
    attn = torch.softmax(torch.randn(batch, queries, heads, levels * points, generator=g), -1)
    return value, torch.tensor(shapes), _starts(shapes), loc, attn.view(batch, queries, heads, levels, points)


def _reference(value, shapes, starts, loc, attn):
    return MultiScaleDeformableAttention()(value, shapes, [tuple(s) for s in shapes.tolist()], starts, loc, attn, 64)


def _exact(value, shapes, starts, loc, attn):
    """The PyTorch path in float64 on the same (possibly bf16-rounded) inputs: the rounding-free answer."""
    return _reference(value.double(), shapes, starts, loc.double(), attn.double())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ----- fp32 and bf16 on Grounding DINO tiny's shapes -----------------------------------------------------------


def test_fp32_on_the_decoder_shapes(interpreter):
    """900 queries over the four real levels, 8 heads of 32, 4 points: the decoder's cross-attention."""
    args = _inputs(1, DECODER_QUERIES, REAL_SHAPES)
    got, want = triton_msda(*args), _reference(*args)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (1, DECODER_QUERIES, 256)
    assert _max_diff(got, want) <= FP32_ATOL


def test_bf16_on_the_decoder_shapes(interpreter):
    """bf16 value, fp32 locations and weights (what autocast hands the layer): fp32 out, as the PyTorch path
    under autocast gives (autocast runs grid_sample in fp32), equal within fp32 rounding. All-bf16 inputs: bf16
    out, within one bf16 rounding of the exact answer on those inputs. (The PyTorch path itself is no reference
    there: fed bf16 locations without autocast, grid_sample computes pixel coordinates in bf16, a quarter
    pixel off at 65 px, and returned NaN for some of these inputs.)"""
    value, shapes, starts, loc, attn = _inputs(1, DECODER_QUERIES, REAL_SHAPES, seed=1)
    value = value.bfloat16()
    got = triton_msda(value, shapes, starts, loc, attn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _reference(value, shapes, starts, loc, attn)
    assert got.dtype == want.dtype == torch.float32
    assert _max_diff(got, want) <= FP32_ATOL

    loc, attn = loc[:, :300].bfloat16(), attn[:, :300].bfloat16()  # a third of the queries: the interpreter is slow
    got = triton_msda(value, shapes, starts, loc, attn)
    exact = _exact(value, shapes, starts, loc, attn)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= BF16_UNIT * exact.abs() + 1e-6).all()
    # rounded to nearest (even), as torch rounds: the fp32 result, cast
    assert torch.equal(got, triton_msda(value.float(), shapes, starts, loc.float(), attn.float()).bfloat16())


@pytest.mark.slow
def test_the_encoder_shapes(interpreter):
    """Every one of the 5,684 pixels of the four levels a query (the encoder's self-attention), batch 1, fp32
    (bf16 on these levels: the decoder test above; the interpreter takes twice as long over bf16)."""
    queries = sum(h * w for h, w in REAL_SHAPES)
    args = _inputs(1, queries, REAL_SHAPES, seed=2)
    got = triton_msda(*args)
    assert _max_diff(got, _reference(*args)) <= FP32_ATOL
    assert _max_diff(got, _exact(*args)) <= FP32_ATOL


def test_real_spatial_shapes():
    """REAL_SHAPES are what Grounding DINO tiny's backbone and extra level give a 518 x 518 input (the
    architecture's layer sizes on the meta device: nothing is computed)."""
    from transformers import GroundingDinoForObjectDetection

    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(GroundingDinoConfig())
        maps, _ = model.model.backbone(torch.zeros(1, 3, 518, 518), torch.ones(1, 518, 518, dtype=torch.long))
        sizes = [tuple(m.shape[-2:]) for m, _ in maps]
        extra = model.model.input_proj_vision[-1](maps[-1][0])
    assert sizes + [tuple(extra.shape[-2:])] == REAL_SHAPES
    config = GroundingDinoConfig()
    assert (config.num_feature_levels, config.encoder_attention_heads, config.encoder_n_points,
            config.d_model // config.encoder_attention_heads) == (len(REAL_SHAPES), HEADS, POINTS, HEAD_DIM)


# ----- awkward shapes --------------------------------------------------------------------------------------------

AWKWARD_SHAPES = [(5, 7), (3, 4), (1, 1), (2, 1)]  # non-square, a level of one pixel, a one-pixel-wide level


@pytest.mark.parametrize("batch", [1, 3, 33])
def test_awkward_batches_and_levels(interpreter, batch):
    args = _inputs(batch, 11, AWKWARD_SHAPES, seed=batch, spread=0.3)
    assert _max_diff(triton_msda(*args), _reference(*args)) <= FP32_ATOL


def test_sampling_points_on_and_outside_the_edges(interpreter):
    """Exactly on 0 and 1, on pixel centres, just outside, far outside (where a cast to int would overflow
    without the clamp), and negative."""
    value, shapes, starts, loc, attn = _inputs(2, 9, AWKWARD_SHAPES, seed=5)
    special = torch.tensor([0.0, 1.0, 0.5, 0.1, 0.9, -0.01, 1.01, -1e6, 1e6, 1.0 / 7, 3.5 / 7, -0.5, 1.5, 1e-7])
    pick = torch.randint(0, len(special), loc.shape, generator=torch.Generator().manual_seed(6))
    loc = special[pick]
    assert _max_diff(triton_msda(value, shapes, starts, loc, attn), _reference(value, shapes, starts, loc, attn)) \
        <= FP32_ATOL


def test_one_level_one_point_and_a_head_width_that_is_not_a_power_of_two(interpreter):
    for shapes, heads, head_dim, points in (([(4, 6)], 2, 24, 1), ([(1, 1), (3, 3)], 3, 8, 3)):
        args = _inputs(2, 5, shapes, heads, head_dim, points, seed=head_dim)
        assert _max_diff(triton_msda(*args), _reference(*args)) <= FP32_ATOL


def test_padding_masks_through_the_layer(interpreter):
    """Grounding DINO's deformable-attention layer with a padding mask (padded positions' values zeroed
    before sampling), its core swapped for the kernel against the same layer on the PyTorch path."""
    config = GroundingDinoConfig()
    torch.manual_seed(0)
    layer = GroundingDinoMultiscaleDeformableAttention(config, num_heads=HEADS, n_points=POINTS).eval()
    shapes = [(6, 8), (3, 4), (2, 2), (1, 1)]
    seq = sum(h * w for h, w in shapes)
    hidden = torch.randn(3, seq, config.d_model)
    mask = torch.ones(3, seq, dtype=torch.bool)
    mask[1, 20:] = False
    mask[2, ::3] = False
    reference_points = torch.rand(3, seq, len(shapes), 2) * 1.2 - 0.1
    kwargs = dict(attention_mask=mask, encoder_hidden_states=hidden, reference_points=reference_points,
                  spatial_shapes=torch.tensor(shapes), spatial_shapes_list=shapes, level_start_index=_starts(shapes))
    with torch.no_grad():
        want, _ = layer(hidden, **kwargs)
        assert msda.install(layer, "triton") == "triton"
        got, _ = layer(hidden, **kwargs)
    assert _max_diff(got, want) <= FP32_ATOL


def test_the_whole_tiny_detector_with_the_kernel(interpreter):
    """The tiny Grounding DINO with every deformable-attention layer on the kernel, against the same weights on
    the PyTorch path: two images of different sizes padded into one batch (pixel masks)."""
    from models.grounding.detector import GroundingDetector, make_image_processor
    from models.grounding.hqloc import build_caption
    from tests.conftest import synthetic_image

    plain, kernel = GroundingDetector.tiny(), GroundingDetector.tiny(deformable_attention="triton")
    assert (plain.deformable_attention, kernel.deformable_attention) == ("pytorch", "triton")
    small_frame = make_image_processor(shortest_edge=160, longest_edge=400)  # the interpreter's pace
    small, large = (small_frame(images=synthetic_image(h, w, seed), return_tensors="pt")["pixel_values"]
                    for h, w, seed in ((120, 150, 1), (140, 200, 2)))
    height, width = max(small.shape[-2], large.shape[-2]), max(small.shape[-1], large.shape[-1])
    pixels = torch.zeros(2, 3, height, width)
    pixel_mask = torch.zeros(2, height, width, dtype=torch.long)
    for i, p in enumerate((small, large)):
        pixels[i, :, : p.shape[-2], : p.shape[-1]] = p[0]
        pixel_mask[i, : p.shape[-2], : p.shape[-1]] = 1
    assert not bool(pixel_mask.all())
    caption = plain.encode_caption(build_caption(["scratch", "crack"]))
    inputs = dict(pixel_values=pixels, pixel_mask=pixel_mask, input_ids=caption.input_ids.expand(2, -1),
                  attention_mask=caption.attention_mask.expand(2, -1),
                  token_type_ids=caption.token_type_ids.expand(2, -1))
    with torch.no_grad():
        want, got = plain.model(**inputs), kernel.model(**inputs)
    finite = torch.isfinite(want.logits)  # positions past the caption are -inf in both
    assert torch.equal(torch.isfinite(got.logits), finite)
    assert _max_diff(got.logits[finite], want.logits[finite]) <= 1e-4
    assert _max_diff(got.pred_boxes, want.pred_boxes) <= 1e-5


# ----- which implementation runs where ---------------------------------------------------------------------------


@pytest.mark.parametrize(("choice", "device", "triton_ok", "expected"), [
    ("auto", "cuda", True, "triton"), ("auto", "cuda", False, "pytorch"), ("auto", "cpu", True, "pytorch"),
    ("auto", "meta", True, "pytorch"), ("pytorch", "cuda", True, "pytorch"), ("hub", "cuda", True, "hub"),
    ("hub", "cpu", True, "pytorch"), ("triton", "cuda", True, "triton"),
])
def test_the_choice_follows_the_device(monkeypatch, choice, device, triton_ok, expected):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert msda.choose(choice, device, triton_ok) == expected


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="runs on CUDA"):
        msda.choose("triton", "cpu", True)
    with pytest.raises(RuntimeError, match="not installed"):
        msda.choose("triton", "cuda", False)
    with pytest.raises(ValueError, match="must be one of"):
        msda.choose("cutlass", "cuda", True)


def _loaded_elsewhere(model: torch.nn.Module) -> None:
    """What transformers' load-time kernelisation leaves on each layer when the model was loaded on a device
    the Hub's kernel serves: a replaced forward and the `kernels` library's repository mark."""
    for layer in msda.deformable_layers(model):
        layer.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the load-time forward ran"))
        layer.__dict__["_kernel_repo"] = "kernels-community/deformable-detr"


def test_the_detector_chooses_after_the_move_not_at_load(monkeypatch):
    """A model whose layers were set up for the device it was loaded on is re-chosen for the device the
    detector puts it on, and reports that: nothing chosen at load time survives the move."""
    from transformers import GroundingDinoForObjectDetection

    from models.grounding.detector import GroundingDetector, load_tiny_config, load_tiny_tokenizer, make_image_processor

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = GroundingDinoForObjectDetection(load_tiny_config())
    _loaded_elsewhere(model)
    assert msda.implementation(model) == "hub"  # what it would have run where it was loaded
    detector = GroundingDetector(model, make_image_processor(), load_tiny_tokenizer(), device="cpu")
    assert detector.deformable_attention == "pytorch"
    assert detector.runtime() == {"deformable_attention": "pytorch", "grounding": "eager"}
    assert all("forward" not in layer.__dict__ for layer in msda.deformable_layers(model))
    # the same model on the meta device (a device the kernel does not serve): chosen there, reported there
    meta = GroundingDetector(model, make_image_processor(), load_tiny_tokenizer(), device="meta",
                             deformable_attention="auto")
    assert meta.deformable_attention == "pytorch" and msda.model_device_type(meta.model) == "meta"


def test_installed_for_cuda_each_call_follows_its_inputs(monkeypatch):
    """Layers given the kernel for CUDA (a model chosen for CUDA, here told so) run the PyTorch path for inputs
    on the CPU, to the bit, and say so: the report is for the device the model runs on."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = GroundingDinoMultiscaleDeformableAttention(GroundingDinoConfig(), num_heads=HEADS, n_points=POINTS)
    monkeypatch.setattr(msda, "triton_available", lambda: True)
    monkeypatch.setattr(msda, "model_device_type", lambda model: "cuda")
    assert msda.install(layer, "auto") == "triton"
    assert msda.implementation(layer, "cuda") == "triton" and msda.implementation(layer, "cpu") == "pytorch"
    args = _inputs(2, 7, AWKWARD_SHAPES)
    assert torch.equal(layer.attn(args[0], args[1], AWKWARD_SHAPES, *args[2:], 64), _reference(*args))
    assert msda.install(layer, "pytorch") == "pytorch" and "forward" not in layer.attn.__dict__


def test_transformers_does_not_take_the_layers_back(monkeypatch):
    """A model loaded with kernels enabled is re-kernelised by transformers when it switches train/eval; after
    `install` it is not, and a forward replaced behind the report's back is reported as what it is."""
    from kernels import Mode
    from transformers import GroundingDinoForObjectDetection

    from models.grounding.detector import load_tiny_config

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = GroundingDinoForObjectDetection(load_tiny_config()).eval()
    model._use_kernels, model._kernels_mode = True, Mode.INFERENCE  # as from_pretrained leaves it
    monkeypatch.setattr(msda, "triton_available", lambda: True)
    monkeypatch.setattr(msda, "model_device_type", lambda m: "cuda")
    assert msda.install(model, "auto") == "triton"
    model.train()
    model.eval()
    assert msda.implementation(model, "cuda") == "triton" and not model.use_kernels
    layer = msda.deformable_layers(model)[0]
    layer.forward = type(layer).forward.__get__(layer)  # someone else's forward
    assert msda.implementation(model, "cuda") == "mixed: pytorch+triton"


def test_a_model_without_deformable_attention_reports_none():
    assert msda.install(torch.nn.Linear(2, 2)) is None and msda.implementation(torch.nn.Linear(2, 2)) is None


def test_bounds_are_meaningful(interpreter):
    """The comparisons can fail: a kernel that samples half a pixel off (align_corners=True) is caught."""
    value, shapes, starts, loc, attn = _inputs(1, 50, AWKWARD_SHAPES, seed=9)
    got = triton_msda(value, shapes, starts, loc, attn)
    half_pixel = torch.tensor([[0.5 / w, 0.5 / h] for h, w in AWKWARD_SHAPES])[None, None, None, :, None, :]
    off = _reference(value, shapes, starts, loc + half_pixel, attn)
    assert _max_diff(got, off) > 100 * FP32_ATOL
    assert np.isfinite(got.numpy()).all()


# ----- the CUDA path's pieces that can be checked without a GPU ----------------------------------------------------


def test_the_custom_op_equals_the_reference(interpreter):
    """`torch.ops.filo.ms_deform_attn`, what the layers call on CUDA, run eagerly (here: interpreted)."""
    from models.grounding.deformable_attention_triton import custom_op

    args = _inputs(2, 7, AWKWARD_SHAPES, seed=11)
    assert _max_diff(custom_op()(*args), _reference(*args)) <= FP32_ATOL


def test_the_custom_op_traces_as_one_operator(monkeypatch):
    """With fake tensors (what torch.compile traces with) the op infers its output without running the kernel
    and stays one node of the graph: no graph break around the kernel in a compiled detector."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from models.grounding.deformable_attention_triton import custom_op

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    op = custom_op()
    value, *rest = _inputs(2, 7, AWKWARD_SHAPES)
    graph = make_fx(op, tracing_mode="fake")(value.bfloat16(), *rest)
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    assert [str(n.target) for n in calls] == ["filo.ms_deform_attn.default"]
    assert calls[0].meta["val"].shape == (2, 7, 256) and calls[0].meta["val"].dtype == torch.float32


def test_a_compiled_layer_keeps_the_kernel_in_its_graph(monkeypatch):
    """torch.compile (fullgraph: a graph break fails) of Grounding DINO's deformable-attention layer with the
    kernel's forward, traced as it is on CUDA: one graph in which the kernel is one operator. The graph then
    runs here under the interpreter and equals the PyTorch path."""
    import os

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(msda, "triton_runs_on", lambda device_type: True)  # what it answers for CUDA inputs
    torch.manual_seed(0)
    layer = GroundingDinoMultiscaleDeformableAttention(GroundingDinoConfig(), num_heads=HEADS, n_points=POINTS)
    shapes = [(6, 8), (3, 4), (2, 2), (1, 1)]
    seq = sum(h * w for h, w in shapes)
    hidden = torch.randn(2, seq, 256)
    kwargs = dict(encoder_hidden_states=hidden, reference_points=torch.rand(2, seq, len(shapes), 2),
                  spatial_shapes=torch.tensor(shapes), spatial_shapes_list=shapes, level_start_index=_starts(shapes))
    with torch.no_grad():
        want, _ = layer(hidden, **kwargs)
    monkeypatch.setattr(msda, "model_device_type", lambda model: "cuda")
    assert msda.install(layer, "triton") == "triton"
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)

        def run(*args):  # traced with the compiled-mode kernel, run with the interpreted one
            os.environ["TRITON_INTERPRET"] = "1"
            try:
                return graph(*args)
            finally:
                del os.environ["TRITON_INTERPRET"]

        return run

    with torch.no_grad():
        got, _ = torch.compile(layer, backend=backend, fullgraph=True)(hidden, **kwargs)
    calls = [str(n.target) for g in graphs for n in g.graph.nodes if "ms_deform_attn" in str(n.target)]
    assert len(graphs) == 1 and calls == ["filo.ms_deform_attn"]
    assert _max_diff(got, want) <= FP32_ATOL


@pytest.mark.slow
def test_the_kernel_compiles_for_hopper(monkeypatch, tmp_path):
    """Triton compiles the kernel for sm_90 (H100, H200) down to a cubin here, without a GPU: the variants the
    service launches (bf16 value under autocast with fp32 weights, and fp32 throughout)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models.grounding import deformable_attention_triton as kernel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for value_type in ("*bf16", "*fp32"):
        signature = {"value_ptr": value_type, "shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32",
                     "attn_ptr": "*fp32", "out_ptr": "*fp32", "rows": "i32", "queries_heads": "i32", "seq_len": "i32",
                     "NUM_HEADS": "i32", "HEAD_DIM": "i32", "NUM_LEVELS": "constexpr", "NUM_POINTS": "constexpr",
                     "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "OUT_BF16": "constexpr"}
        constants = {"NUM_LEVELS": 4, "NUM_POINTS": POINTS, "BLOCK_M": kernel.BLOCK_M_GPU, "BLOCK_D": HEAD_DIM,
                     "OUT_BF16": False}
        compiled = triton.compile(ASTSource(kernel.msda_kernel(), signature, constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": kernel.NUM_WARPS})
        assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
