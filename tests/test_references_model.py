"""models/references.py alone: memory, coreset, both distances, maps, fusion (tensors in, tensors out)."""

from __future__ import annotations

import pytest
import torch

from models import references as mr


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_nearest_distance_is_one_minus_max_cosine_against_brute_force():
    q, m = _unit(2, 9, 8), _unit(30, 8, seed=1)
    want = 1 - torch.einsum("bnc,mc->bnm", q, m).max(dim=-1).values
    torch.testing.assert_close(mr.nearest_distance(q, m), want)
    assert torch.allclose(mr.nearest_distance(m[None, :5], m), torch.zeros(1, 5), atol=1e-6)  # in memory: 0


def test_positional_distance_only_matches_inside_the_window():
    grid = 4
    pos = mr.grid_positions(grid)
    mem = _unit(grid * grid, 8, seed=2)
    query = mem.flip(0)[None]  # patch p holds the feature of patch 15 - p
    d_global = mr.nearest_distance(query, mem)
    d_pos = mr.positional_distance(query, mem, pos, pos, radius_cells=1.0)
    assert torch.allclose(d_global, torch.zeros_like(d_global), atol=1e-6)  # found somewhere
    far = (pos - pos.flip(0)).norm(dim=1) > 1.0
    assert (d_pos[0, far] > 1e-3).all()  # not allowed that far away
    # brute force of the window rule
    sim = query[0] @ mem.T
    sim[(torch.cdist(pos, pos) > 1.0)] = -2
    torch.testing.assert_close(d_pos[0], 1 - sim.max(dim=1).values)


def test_positional_distance_falls_back_to_the_whole_memory_for_an_empty_window():
    q, m = _unit(1, 2, 8), _unit(3, 8, seed=3)
    qpos = torch.tensor([[0.0, 0.0], [50.0, 50.0]])
    mpos = torch.zeros(3, 2)
    d = mr.positional_distance(q, m, qpos, mpos, radius_cells=1.0)
    torch.testing.assert_close(d[0, 1], mr.nearest_distance(q, m)[0, 1])


def test_greedy_coreset_is_deterministic_covers_outliers_and_keeps_all_under_budget():
    x = torch.cat([torch.zeros(50, 4) + 0.01 * torch.randn(50, 4), torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])])
    idx = mr.greedy_coreset(x, 4, seed=0)
    assert idx.tolist() == mr.greedy_coreset(x, 4, seed=0).tolist()
    assert {50, 51} <= set(idx.tolist())  # the far points are what k-center keeps first
    assert len(set(idx.tolist())) == 4
    assert mr.greedy_coreset(x, 100).tolist() == list(range(52))


def test_build_memory_compact_dtype_budget_and_scale():
    k, g, c = 3, 5, 16
    toks = [_unit(k, g * g, c, seed=s) for s in range(4)]
    mem = mr.build_memory(toks)
    assert mem.grid == g and mem.n_images == k and mem.n_patches == [k * g * g] * 4
    assert all(t.features.dtype == torch.float16 for t in mem.taps)
    assert mem.nbytes == 4 * (k * g * g * c * 2 + k * g * g * 2 * 4)
    small = mr.build_memory(toks, max_patches=20)
    assert small.n_patches == [20] * 4 and small.scale == mem.scale  # scale from the full features
    loo = mr.leave_one_out_distances(toks)
    assert loo.shape == (k, g * g)
    assert mem.scale == pytest.approx(float(torch.quantile(loo.flatten(), mr.SCALE_QUANTILE)))
    one = mr.build_memory([t[:1] for t in toks])
    assert one.scale == mr.FALLBACK_SCALE
    with pytest.raises(ValueError):
        mr.build_memory(toks, match="anywhere")


def test_few_shot_map_is_low_on_a_reference_and_high_where_a_patch_changed():
    g, c = 6, 16
    toks = [_unit(2, g * g, c, seed=s) for s in (10, 11)]
    mem = mr.build_memory(toks, dtype=torch.float32)
    same = mr.few_shot_map([t[:1] for t in toks], mem, 24)
    assert same.shape == (1, 24, 24) and float(same.max()) < 1e-5
    changed = [t[:1].clone() for t in toks]
    for t in changed:
        t[0, 14] = _unit(c, seed=99)
    fmap = mr.few_shot_map(changed, mem, 24)
    assert float(fmap.min()) >= 0 and float(fmap.max()) < 1
    row, col = divmod(int(fmap[0].argmax()), 24)
    assert abs(row - 2 * 24 / (g - 1)) <= 5 and abs(col - 2 * 24 / (g - 1)) <= 5  # patch 14 = cell (2, 2)


def test_squash_fuse_and_leave_one_out_scores():
    d = torch.tensor([0.0, 0.1, 0.2])
    torch.testing.assert_close(mr.squash(d, 0.1), torch.tensor([0.0, 0.5, 0.75]))
    z, f = torch.full((1, 4, 4), 0.4), torch.full((1, 4, 4), 0.8)
    torch.testing.assert_close(mr.fuse_maps(z, f, 0.75), torch.full((1, 4, 4), 0.7))
    toks = [_unit(3, 16, 8, seed=s) for s in range(2)]
    mem = mr.build_memory(toks)
    loo = mr.leave_one_out_distances(toks)
    zs, text = torch.full((3, 12, 12), 0.5), torch.tensor([0.1, 0.2, 0.3])
    scores = mr.leave_one_out_scores(loo, zs, text, mem, 12)
    few = mr.squash(mr.distance_map(loo, 12), mem.scale)
    want = (text + (0.25 * 0.5 + 0.75 * few).flatten(1).max(1).values) / 2
    torch.testing.assert_close(scores, want)


def test_patch_tokens_drop_cls_and_centre_each_image_alone():
    stream = [torch.randn(2, 1 + 9, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    plain = mr.patch_tokens(stream, center=False)
    torch.testing.assert_close(plain[0], torch.nn.functional.normalize(stream[0][:, 1:], dim=-1))
    shifted = [t + torch.tensor([3.0] + [0.0] * 7) * torch.tensor([1.0, -2.0])[:, None, None] for t in stream]
    centred, centred_shifted = mr.patch_tokens(stream), mr.patch_tokens(shifted)
    for a, b in zip(centred, centred_shifted):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # a shift shared by an image's patches is gone
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 9))
    one = mr.patch_tokens([t[1:] for t in stream])
    torch.testing.assert_close(one[0], centred[0][1:])  # the other image in the batch changes nothing
