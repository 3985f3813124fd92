"""Multi-scale deformable attention (Deformable DETR, Grounding DINO) as a Triton kernel of our own.

The same computation as transformers' pure-PyTorch `MultiScaleDeformableAttention.forward` (one `grid_sample`
per level, bilinear, zero padding, `align_corners=False`, then the attention-weighted sum over levels and
points), in one kernel launch instead of four `grid_sample`s, a stack and a reduction over a
(B*H, D, Q, L*P) intermediate.

Layout. One row is one (image, query, head); a program takes `BLOCK_M` rows and all `D` channels of a head.
For every level and point it reads the row's sampling location and attention weight, and gathers the four
neighbouring value vectors (each `D` contiguous elements of `value[b, s, h, :]`), masked where a corner lies
outside the level's map (zero padding). Accumulation is fp32 whatever the input dtype; the output is written
in the dtype the PyTorch path returns (`value` and `attention_weights` promoted), so a caller sees no
difference but the rounding.

The kernel is compiled by Triton on the GPU machine itself (no nvcc, nothing from the Hub), and runs on the
CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which is how it is tested where no GPU is
(tests/test_deformable_attention.py). `triton.jit` reads that variable when it decorates, so the kernel is
decorated on first use (`msda_kernel`), once per mode, and a test may switch the interpreter on after triton
was imported. For that the kernel calls Triton's builtins only, none of the helpers `triton.language` itself
defines with `@triton.jit` when it is imported (`tl.zeros`, `tl.cdiv`, reductions...): those would stay
compiled-mode functions, which the interpreter refuses to call.
"""

from __future__ import annotations

import os

import torch

try:  # ships with the CUDA build of torch; absent from CPU-only installs, where nothing calls the kernel
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

# rows (image, query, head) per program on a GPU; the interpreter runs programs one after another in Python,
# so it takes far bigger blocks (same results: rows are independent)
BLOCK_M_GPU = 64
BLOCK_M_INTERPRETER = 4096
NUM_WARPS = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "on", "yes"}


def _msda_body(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
               rows, queries_heads, seq_len,
               NUM_HEADS, HEAD_DIM,
               NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               OUT_BF16: tl.constexpr):
    pid = tl.program_id(0)
    row = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (image * Q + query) * H + head
    row_ok = row < rows
    row64 = row.to(tl.int64)
    image = row64 // queries_heads
    head = row64 % NUM_HEADS
    chan = tl.arange(0, BLOCK_D)
    chan_ok = chan < HEAD_DIM
    # value[b, s, h, d] = value_ptr[((b * S + s) * H + h) * D + d]
    value_row = (image * seq_len * NUM_HEADS + head) * HEAD_DIM
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for level in range(NUM_LEVELS):  # a loop, not unrolled: a quarter of the code to compile
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        height_f = height.to(tl.float32)
        width_f = width.to(tl.float32)
        for point in tl.static_range(NUM_POINTS):
            sample = row64 * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            loc_x = tl.load(loc_ptr + 2 * sample, mask=row_ok, other=0.0).to(tl.float32)
            loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=row_ok, other=0.0).to(tl.float32)
            weight = tl.load(attn_ptr + sample, mask=row_ok, other=0.0).to(tl.float32)
            # grid_sample, align_corners=False: pixel centres at (i + 0.5) / size
            x = loc_x * width_f - 0.5
            y = loc_y * height_f - 0.5
            # far outside the map every corner is masked anyway; clamping keeps the integer casts in range
            x = tl.minimum(tl.maximum(x, -2.0), width_f + 1.0)
            y = tl.minimum(tl.maximum(y, -2.0), height_f + 1.0)
            x0f = tl.floor(x)
            y0f = tl.floor(y)
            fx = x - x0f
            fy = y - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            for corner in tl.static_range(4):
                dx = corner % 2
                dy = corner // 2
                xi = x0 + dx
                yi = y0 + dy
                wx = fx if dx == 1 else 1.0 - fx
                wy = fy if dy == 1 else 1.0 - fy
                inside = row_ok & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                position = (start + yi.to(tl.int64) * width + xi.to(tl.int64))
                offsets = value_row + position * (NUM_HEADS * HEAD_DIM)
                ptrs = value_ptr + offsets[:, None] + chan[None, :]
                vals = tl.load(ptrs, mask=inside[:, None] & chan_ok[None, :], other=0.0).to(tl.float32)
                acc += (weight * wx * wy)[:, None] * vals
    out_ptrs = out_ptr + row64[:, None] * HEAD_DIM + chan[None, :]
    if OUT_BF16:
        # round to nearest even by hand, as torch does: Triton's interpreter truncates fp32 -> bf16 casts, and
        # the kernel must round alike wherever it runs
        bits = acc.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, out, mask=row_ok[:, None] & chan_ok[None, :])


_KERNELS: dict[bool, object] = {}


def msda_kernel():
    """The jitted kernel (an interpreted one while `TRITON_INTERPRET=1`)."""
    interpret = _interpreting()
    kernel = _KERNELS.get(interpret)
    if kernel is None:
        import triton

        kernel = _KERNELS[interpret] = triton.jit(_msda_body)
    return kernel


def _check(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
           attention_weights: torch.Tensor) -> None:
    batch, _, heads, _ = value.shape
    b2, _, h2, levels, _, two = sampling_locations.shape
    if (b2, h2, two) != (batch, heads, 2) or tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise ValueError(f"shapes disagree: value {tuple(value.shape)}, sampling_locations "
                         f"{tuple(sampling_locations.shape)}, attention_weights {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (levels, 2):
        raise ValueError(f"spatial_shapes must be ({levels}, 2), got {tuple(spatial_shapes.shape)}")


def output_dtype(value: torch.Tensor, attention_weights: torch.Tensor) -> torch.dtype:
    """The dtype the PyTorch path returns: the sampled values (value's dtype) times the weights, promoted."""
    return torch.promote_types(value.dtype, attention_weights.dtype)


def launch(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
           sampling_locations: torch.Tensor, attention_weights: torch.Tensor, out: torch.Tensor,
           kernel_wrapper=None, block_m: int | None = None) -> torch.Tensor:
    """Run the kernel into `out` ((B, Q, H*D), contiguous); `kernel_wrapper` wraps the jitted kernel
    (`torch.library.wrap_triton` inside the custom op, so that torch.compile sees it)."""
    batch, seq_len, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    rows = batch * queries * heads
    if block_m is None:
        block_m = BLOCK_M_INTERPRETER if _interpreting() else BLOCK_M_GPU
    kernel = msda_kernel()
    if kernel_wrapper is not None:
        kernel = kernel_wrapper(kernel)
    grid = (max(1, -(-rows // block_m)),)
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    extra = {} if _interpreting() else {"num_warps": NUM_WARPS}
    kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
                 rows, queries * heads, seq_len, heads, head_dim, NUM_LEVELS=levels, NUM_POINTS=points,
                 BLOCK_M=block_m, BLOCK_D=block_d, OUT_BF16=out.dtype == torch.bfloat16, **extra)
    return out


def multi_scale_deformable_attention(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                     level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                     attention_weights: torch.Tensor, block_m: int | None = None) -> torch.Tensor:
    """(B, S, H, D) value, (L, 2) level shapes (height, width), (L,) level starts, (B, Q, H, L, P, 2) sampling
    locations in [0, 1] (x, y), (B, Q, H, L, P) attention weights -> (B, Q, H*D).

    Called directly (eager): on CUDA and, under `TRITON_INTERPRET=1`, on the CPU. On CUDA the serving path
    calls the custom op `torch.ops.filo.ms_deform_attn` instead, the same launch made visible to torch.compile.
    """
    _check(value, spatial_shapes, sampling_locations, attention_weights)
    batch, _, heads, head_dim = value.shape
    queries = sampling_locations.shape[1]
    out = torch.empty(batch, queries, heads * head_dim, device=value.device,
                      dtype=output_dtype(value, attention_weights))
    return launch(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                  sampling_locations.contiguous(), attention_weights.contiguous(), out, block_m=block_m)


_OP = None


def custom_op():
    """`torch.ops.filo.ms_deform_attn`, registered on first use with `torch.library.triton_op`: the kernel
    as one operator that torch.compile traces into its graph (no graph break) and eager mode calls directly."""
    global _OP
    if _OP is not None:
        return _OP
    from torch.library import triton_op, wrap_triton

    @triton_op("filo::ms_deform_attn", mutates_args=())
    def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                       sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
        batch, _, heads, head_dim = value.shape
        queries = sampling_locations.shape[1]
        out = torch.empty(batch, queries, heads * head_dim, device=value.device,
                          dtype=output_dtype(value, attention_weights))
        return launch(value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                      sampling_locations.contiguous(), attention_weights.contiguous(), out,
                      kernel_wrapper=wrap_triton)

    _OP = ms_deform_attn
    return _OP
