"""Few-shot normal references: a patch-feature memory and its distances, fused with FiLo's zero-shot map.

Tensors in, tensors out (like anomalib's winclip `utils.py`); each function is tested alone in
tests/test_references_model.py, and `service/engine/pipeline.py` only strings them together.

What is remembered: the encoder's raw standard-stream tokens at its four taps (blocks 6/12/18/24
of ViT-L, 2/4/6/8 of the demo's tiny CLIP), CLS dropped, L2-normalised: the features APRIL-GAN
matches, taken before ln_post and before any FiLo head, so a checkpoint's heads never change them.
The inspected image's own taps come from its one forward pass (`EncoderOutput.stream`).

Per tap and patch the distance is 1 - max cosine to the memory, either over the whole memory
("global", APRIL-GAN / WinCLIP+) or only over memory patches within `radius` grid cells of the
patch's own position ("position", in the spirit of FiLo++'s position-enhanced matching: a bolt's
head edge must match head edges where a head edge belongs, not any edge anywhere). Distances are
averaged over taps, upsampled and smoothed exactly like the zero-shot layer maps, then squashed to
[0, 1) by the memory's own scale (leave-one-out distances of the references, so no test set is
needed) and fused with the zero-shot map by a convex weight (docs/few-shot.md gives the measurements).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import anomaly_maps as am
from models.constants import DEFAULT_MATCH, DEFAULT_RADIUS, DEFAULT_WEIGHT, MATCH_MODES

SCALE_QUANTILE = 0.99  # of the references' leave-one-out patch distances: squashes to 0.5
FALLBACK_SCALE = 0.05  # one reference has no leave-one-out: a typical figure of the demo model
_MAX_SIM_ELEMENTS = 1 << 26  # query rows x memory rows per similarity block (256 MB in fp32)


@dataclass
class TapMemory:
    """One tap's memory. features (M, C) unit rows, compact dtype; positions (M, 2) float (row, col) cells."""

    features: torch.Tensor
    positions: torch.Tensor


@dataclass
class ReferenceMemory:
    """A category's normal-patch memory: one `TapMemory` per tap, the patch grid side and the distance scale.

    `scale` is the SCALE_QUANTILE of the references' leave-one-out patch distances (what a normal
    patch scores); `loo_scores` are those references' image scores with the others as memory
    (the material of a threshold calibrated from references alone; empty with one reference).
    """

    taps: list[TapMemory]
    grid: int
    n_images: int
    scale: float
    match: str = DEFAULT_MATCH
    radius: float = DEFAULT_RADIUS
    weight: float = DEFAULT_WEIGHT
    loo_scores: tuple[float, ...] = ()

    @property
    def nbytes(self) -> int:
        """Device bytes held (features and positions of every tap)."""
        return sum(t.features.numel() * t.features.element_size()
                   + t.positions.numel() * t.positions.element_size() for t in self.taps)

    @property
    def n_patches(self) -> list[int]:
        return [t.features.shape[0] for t in self.taps]

    def to(self, device: torch.device | str) -> ReferenceMemory:
        taps = [TapMemory(t.features.to(device), t.positions.to(device)) for t in self.taps]
        return ReferenceMemory(taps, self.grid, self.n_images, self.scale, self.match, self.radius,
                               self.weight, self.loo_scores)


# --- building ------------------------------------------------------------------------------------


def patch_tokens(stream: Sequence[torch.Tensor], center: bool = True) -> list[torch.Tensor]:
    """Encoder stream taps, each (B, 1+N, C) -> (B, N, C) float32 unit rows (CLS dropped).

    With `center`, each image's mean patch token is subtracted first (per image and tap, so no other
    image is involved): what every patch of an image shares (its overall brightness and colour cast)
    then no longer counts as distance. Measured on the demo model (docs/few-shot.md): pixel AUROC
    0.964 -> 0.976 and 0.970 -> 0.974 on two synthetic seeds.
    """
    out = []
    for t in stream:
        p = t[:, 1:].float()
        out.append(am.normalize(p - p.mean(dim=1, keepdim=True) if center else p))
    return out


def grid_positions(grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(grid*grid, 2) float (row, col) of each patch in the ViT's row-major token order."""
    r, c = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    return torch.stack([r, c], dim=-1).reshape(-1, 2).float()


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """PatchCore's greedy k-center subsampling: (M, C) -> (n,) int64 indices of the rows kept.

    Each step adds the row farthest from everything kept so far (Euclidean, on a seeded random
    projection to `projection_dim` dimensions as PatchCore does), so the kept rows cover the
    memory's spread; deterministic for a given seed. n >= M keeps every row.
    """
    m = features.shape[0]
    if n >= m:
        return torch.arange(m, device=features.device)
    x = features.float()
    if x.shape[1] > projection_dim:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        proj = torch.randn(x.shape[1], projection_dim, generator=gen).to(x.device) / math.sqrt(projection_dim)
        x = x @ proj
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = int(torch.randint(m, (1,), generator=gen))
    chosen = torch.empty(n, dtype=torch.long, device=x.device)
    chosen[0] = start
    nearest = (x - x[start]).norm(dim=1)
    for k in range(1, n):
        idx = int(torch.argmax(nearest))
        chosen[k] = idx
        nearest = torch.minimum(nearest, (x - x[idx]).norm(dim=1))
    return chosen


def build_memory(tokens: Sequence[torch.Tensor], max_patches: int | None = None, dtype: torch.dtype = torch.float16,
                 match: str = DEFAULT_MATCH, radius: float = DEFAULT_RADIUS, weight: float = DEFAULT_WEIGHT,
                 seed: int = 0, loo_distances: torch.Tensor | None = None) -> ReferenceMemory:
    """Per tap (K, N, C) unit reference tokens -> the memory; past `max_patches` rows per tap a coreset.

    The scale comes from the full features (before any coreset): each reference's patches matched
    against the other references (the same `match` rule), its SCALE_QUANTILE; `loo_distances` passes
    an already computed `leave_one_out_distances(tokens, match, radius)`.
    """
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, not {match!r}")
    k, n, _ = tokens[0].shape
    grid = int(round(math.sqrt(n)))
    if grid * grid != n:
        raise ValueError(f"{n} patches do not form a square grid")
    pos = grid_positions(grid, tokens[0].device).repeat(k, 1)
    taps = []
    for t in tokens:
        flat = t.reshape(k * n, -1)
        keep = greedy_coreset(flat, max_patches, seed=seed) if max_patches else torch.arange(k * n)
        keep = keep.to(flat.device)
        taps.append(TapMemory(flat[keep].to(dtype).contiguous(), pos[keep].contiguous()))
    if k > 1:
        loo = leave_one_out_distances(tokens, match, radius) if loo_distances is None else loo_distances
        scale = distance_scale(loo)
    else:
        scale = FALLBACK_SCALE
    return ReferenceMemory(taps, grid, k, scale, match, radius, weight)


def leave_one_out_distances(tokens: Sequence[torch.Tensor], match: str = DEFAULT_MATCH,
                            radius: float = DEFAULT_RADIUS) -> torch.Tensor:
    """Per tap (K, N, C) reference tokens, K >= 2 -> (K, N): tap-mean distance of each reference's
    patches to the other K-1 references (what a normal patch of an unseen good image scores)."""
    k, n, _ = tokens[0].shape
    grid = int(round(math.sqrt(n)))
    pos = grid_positions(grid, tokens[0].device)
    out = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        taps = [TapMemory(t[others].reshape(-1, t.shape[-1]), pos.repeat(len(others), 1)) for t in tokens]
        out.append(tap_mean_distance([t[i:i + 1] for t in tokens], taps, grid, match, radius)[0])
    return torch.stack(out)


def distance_scale(loo_distances: torch.Tensor) -> float:
    """The SCALE_QUANTILE of leave-one-out distances (K, N) (floored: a flat memory must not divide by 0)."""
    return max(float(torch.quantile(loo_distances.flatten().float(), SCALE_QUANTILE)), 1e-6)


# --- distances -----------------------------------------------------------------------------------


def nearest_distance(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """1 - max cosine: query (B, N, C) unit rows, memory (M, C) unit rows -> (B, N)."""
    return 1.0 - _max_similarity(query, memory, None)


def positional_distance(query: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor,
                        memory_pos: torch.Tensor, radius_cells: float) -> torch.Tensor:
    """1 - max cosine over memory rows within `radius_cells` (Euclidean, in grid cells) of each query patch.

    query (B, N, C), memory (M, C), query_pos (N, 2), memory_pos (M, 2) -> (B, N). A patch with no
    memory row in its window (a coreset can leave one empty) falls back to the whole memory.
    """
    near = torch.cdist(query_pos.float(), memory_pos.float()) <= radius_cells + 1e-6  # (N, M)
    restricted = _max_similarity(query, memory, near)
    empty = ~near.any(dim=1)
    if bool(empty.any()):
        restricted = torch.where(empty[None], _max_similarity(query, memory, None), restricted)
    return 1.0 - restricted


def _max_similarity(query: torch.Tensor, memory: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """max over memory rows (optionally only the `allowed` (N, M) ones) of query . memory, in blocks of rows."""
    b, n, _ = query.shape
    mem = memory.to(query.dtype) if query.device.type == "cpu" else memory
    q = query.to(mem.dtype)
    rows = max(1, _MAX_SIM_ELEMENTS // max(1, mem.shape[0]))
    out = torch.empty(b, n, dtype=torch.float32, device=query.device)
    for s in range(0, n, rows):
        sim = q[:, s:s + rows] @ mem.T  # (B, r, M)
        if allowed is not None:
            sim = sim.masked_fill(~allowed[s:s + rows][None], -2.0)
        out[:, s:s + rows] = sim.max(dim=-1).values.float()
    return out


def tap_mean_distance(tokens: Sequence[torch.Tensor], taps: Sequence[TapMemory], grid: int,
                      match: str = DEFAULT_MATCH, radius: float = DEFAULT_RADIUS) -> torch.Tensor:
    """Per tap (B, N, C) unit query tokens against the tap's memory -> (B, N) mean distance over taps."""
    if len(tokens) != len(taps):
        raise ValueError(f"{len(tokens)} query taps for a memory of {len(taps)}")
    total = None
    qpos = grid_positions(grid, tokens[0].device)
    for tok, mem in zip(tokens, taps, strict=True):
        if match == "global":
            d = nearest_distance(tok, mem.features)
        else:
            d = positional_distance(tok, mem.features, qpos, mem.positions, radius * grid)
        total = d if total is None else total + d
    return total / len(tokens)


# --- maps, fusion, score -------------------------------------------------------------------------


def distance_map(distances: torch.Tensor, size: int) -> torch.Tensor:
    """(B, N) patch distances -> (B, size, size): bilinear (align_corners=True) and the zero-shot maps'
    Gaussian smoothing (`anomaly_maps.two_channel_map` / `layer_anomaly_map`)."""
    b, n = distances.shape
    g = int(round(math.sqrt(n)))
    up = F.interpolate(distances.reshape(b, 1, g, g).float(), size=(size, size), mode="bilinear", align_corners=True)
    return am.gaussian_blur(up[:, 0])


def squash(distance: torch.Tensor, scale: float) -> torch.Tensor:
    """Distances -> [0, 1): 1 - 2^(-d / scale), so a normal patch at the memory's scale reads 0.5."""
    return 1.0 - torch.exp2(-distance / scale)


def few_shot_map(tokens: Sequence[torch.Tensor], memory: ReferenceMemory, size: int) -> torch.Tensor:
    """Per tap (B, N, C) unit tokens of the inspected images -> (B, size, size) few-shot map in [0, 1)."""
    d = tap_mean_distance(tokens, memory.taps, memory.grid, memory.match, memory.radius)
    return squash(distance_map(d, size), memory.scale)


def fuse_maps(zero_shot: torch.Tensor, few_shot: torch.Tensor, weight: float) -> torch.Tensor:
    """(..., S, S) each -> (1 - weight) * zero-shot + weight * few-shot (both in [0, 1], so is the result)."""
    return (1.0 - weight) * zero_shot + weight * few_shot


def leave_one_out_scores(loo_distances: torch.Tensor, zero_shot_maps: torch.Tensor, text_abnormal: torch.Tensor,
                         memory: ReferenceMemory, size: int) -> torch.Tensor:
    """Each reference's image score with the other references as its memory: (K,).

    loo_distances (K, N) from `leave_one_out_distances`, zero_shot_maps (K, S, S), text_abnormal (K,).
    The score is FiLo's own rule on the fused map, (text_probs[abnormal] + max fused map) / 2, exactly
    what an inspection with references answers: the normal scores a reference-only threshold is set from.
    """
    few = squash(distance_map(loo_distances, size), memory.scale)
    fused = fuse_maps(zero_shot_maps.float(), few, memory.weight)
    return am.image_score(text_abnormal.float(), fused.flatten(1).max(dim=1).values)
