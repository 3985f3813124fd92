"""FiLo's training losses against hand-computed values, plain loops and a literal re-statement of the
released code (its FocalLoss / BinaryDiceLoss classes, as written there)."""

from __future__ import annotations

import math

import pytest
import torch

from filo_lab.training.losses import adapter_loss, dice_loss, focal_loss, segmentation_loss


def _softmax_maps(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, h, w, generator=g, dtype=torch.float64).mul(3).softmax(dim=1)


def _masks(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, h, w, generator=g) > 0.7).double()


# --- literal released code ------------------------------------------------------------------------


def _released_focal(logit: torch.Tensor, target: torch.Tensor, gamma: float = 2, smooth: float = 1e-5):
    """The released FocalLoss.forward (apply_nonlin=None, alpha=None, balance_index=0, size_average)."""
    num_class = logit.shape[1]
    if logit.dim() > 2:
        logit = logit.view(logit.size(0), logit.size(1), -1)
        logit = logit.permute(0, 2, 1).contiguous()
        logit = logit.view(-1, logit.size(-1))
    target = torch.squeeze(target, 1)
    target = target.view(-1, 1)
    alpha = torch.ones(num_class, 1)
    idx = target.cpu().long()
    one_hot_key = torch.zeros(target.size(0), num_class, dtype=logit.dtype)
    one_hot_key = one_hot_key.scatter_(1, idx, 1)
    one_hot_key = torch.clamp(one_hot_key, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot_key * logit).sum(1) + smooth
    logpt = pt.log()
    alpha = torch.squeeze(alpha[idx])
    loss = -1 * alpha * torch.pow((1 - pt), gamma) * logpt
    return loss.mean()


def _released_dice(inputs: torch.Tensor, targets: torch.Tensor):
    """The released BinaryDiceLoss.forward."""
    n = targets.size()[0]
    smooth = 1
    input_flat = inputs.view(n, -1)
    targets_flat = targets.view(n, -1)
    intersection = input_flat * targets_flat
    n_dice_eff = (2 * intersection.sum(1) + smooth) / (input_flat.sum(1) + targets_flat.sum(1) + smooth)
    return 1 - n_dice_eff.sum() / n


# --- plain loops ------------------------------------------------------------------------------------


def _loop_focal(probs: torch.Tensor, mask: torch.Tensor) -> float:
    total, count = 0.0, 0
    b, c, h, w = probs.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                cls = int(mask[i, y, x])
                p_t = 1e-5
                for k in range(c):
                    target = min(max(1.0 if k == cls else 0.0, 1e-5 / (c - 1)), 1 - 1e-5)
                    p_t += target * float(probs[i, k, y, x])
                total += -((1 - p_t) ** 2) * math.log(p_t)
                count += 1
    return total / count


def _loop_dice(p: torch.Tensor, y: torch.Tensor) -> float:
    per_sample = []
    for i in range(p.shape[0]):
        inter = sum(float(a) * float(b) for a, b in zip(p[i].flatten(), y[i].flatten()))
        per_sample.append(1 - (2 * inter + 1) / (float(p[i].sum()) + float(y[i].sum()) + 1))
    return sum(per_sample) / len(per_sample)


# --- focal ------------------------------------------------------------------------------------------


def test_focal_hand_computed_single_pixels():
    # one pixel, p(normal) = 0.8, normal ground truth: one-hot (1 - 1e-5, 1e-5)
    probs = torch.tensor([0.8, 0.2], dtype=torch.float64).view(1, 2, 1, 1)
    p_t = (1 - 1e-5) * 0.8 + 1e-5 * 0.2 + 1e-5
    expected = -((1 - p_t) ** 2) * math.log(p_t)
    assert expected == pytest.approx(0.04 * -math.log(0.8), rel=1e-3)  # 0.0089257...
    got = focal_loss(probs, torch.zeros(1, 1, 1))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # the same pixel called anomalous: p_t ~ 0.2, a much larger loss
    p_t = 1e-5 * 0.8 + (1 - 1e-5) * 0.2 + 1e-5
    assert float(focal_loss(probs, torch.ones(1, 1, 1))) == pytest.approx(-((1 - p_t) ** 2) * math.log(p_t))
    assert float(focal_loss(probs, torch.ones(1, 1, 1))) == pytest.approx(0.64 * -math.log(0.2), rel=1e-3)


def test_focal_mean_over_pixels_hand_computed():
    # two pixels: a perfect one (p_t = 1 - 1e-5 + ... ~ 1: loss ~ 0) and p_t = 0.5
    probs = torch.tensor([[1.0, 0.5], [0.0, 0.5]], dtype=torch.float64).view(1, 2, 1, 2)
    mask = torch.zeros(1, 1, 2)
    p1 = (1 - 1e-5) * 1.0 + 1e-5 * 0.0 + 1e-5
    p2 = (1 - 1e-5) * 0.5 + 1e-5 * 0.5 + 1e-5
    expected = (-((1 - p1) ** 2) * math.log(p1) - (1 - p2) ** 2 * math.log(p2)) / 2
    assert float(focal_loss(probs, mask)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.25 * math.log(2) / 2, rel=1e-3)


def test_focal_equals_loop_and_released_code():
    probs, mask = _softmax_maps(2, 5, 6), _masks(2, 5, 6)
    ours = float(focal_loss(probs, mask))
    assert ours == pytest.approx(_loop_focal(probs, mask), rel=1e-10)
    assert ours == pytest.approx(float(_released_focal(probs, mask[:, None])), rel=1e-10)
    # a (B, 1, H, W) mask is the same thing
    assert float(focal_loss(probs, mask[:, None])) == ours


def test_focal_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        focal_loss(torch.rand(1, 2, 4, 4), torch.zeros(1, 4, 5))
    with pytest.raises(ValueError):
        focal_loss(torch.rand(2, 4, 4), torch.zeros(2, 4))


# --- dice -------------------------------------------------------------------------------------------


def test_dice_hand_computed():
    p = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert float(dice_loss(p, y)) == pytest.approx(1 - 3 / 4)  # (2*1 + 1) / (2 + 1 + 1)
    # batch mean of two samples: 0.25 and a perfect 0
    p2 = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    y2 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert float(dice_loss(p2, y2)) == pytest.approx((0.25 + 0.0) / 2)
    # an empty mask and an empty prediction agree perfectly thanks to the +1 smoothing
    assert float(dice_loss(torch.zeros(1, 9), torch.zeros(1, 9))) == 0.0
    # half-probabilities on a 2-pixel mask of which one is anomalous: (2*0.5 + 1) / (1 + 1 + 1)
    assert float(dice_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]]))) == pytest.approx(1 / 3)


def test_dice_equals_loop_and_released_code():
    probs, mask = _softmax_maps(3, 4, 5, seed=2), _masks(3, 4, 5, seed=3)
    ours = float(dice_loss(probs[:, 1], mask))
    assert ours == pytest.approx(_loop_dice(probs[:, 1], mask), rel=1e-10)
    assert ours == pytest.approx(float(_released_dice(probs[:, 1], mask)), rel=1e-12)
    with pytest.raises(ValueError):
        dice_loss(torch.rand(2, 3), torch.rand(2, 4))


# --- phase losses -----------------------------------------------------------------------------------


def test_segmentation_loss_sums_focal_and_both_dice_over_the_maps():
    maps = [_softmax_maps(2, 6, 6, seed=s) for s in range(7)]
    mask = _masks(2, 6, 6, seed=9)
    expected_focal = sum(_loop_focal(m, mask) for m in maps)
    expected_dice = sum(_loop_dice(m[:, 1], mask) + _loop_dice(m[:, 0], 1 - mask) for m in maps)
    total, parts = segmentation_loss(maps, mask)
    assert parts["focal"] == pytest.approx(expected_focal, rel=1e-9)
    assert parts["dice"] == pytest.approx(expected_dice, rel=1e-9)
    assert float(total) == pytest.approx(expected_focal + expected_dice, rel=1e-9)
    with pytest.raises(ValueError):
        segmentation_loss([], mask)


def test_segmentation_loss_gradient_is_finite_and_pushes_toward_the_mask():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2] = 1
    total, _ = segmentation_loss([logits.softmax(dim=1)] * 7, mask)
    total.backward()
    g = logits.grad
    assert torch.isfinite(g).all()
    # descending the gradient raises the abnormal logit where the mask is 1 and lowers it elsewhere
    assert (g[0, 1, :2] < 0).all() and (g[0, 1, 2:] > 0).all()


def test_adapter_loss_is_temperature_scaled_cross_entropy():
    text_probs = torch.tensor([[0.30, 0.25], [0.20, 0.28]], dtype=torch.float64)
    labels = torch.tensor([1, 1])
    expected = 0.0
    for (n, a), y in zip(text_probs.tolist(), labels.tolist()):
        logits = [n / 0.07, a / 0.07]
        expected += -(logits[y] - math.log(math.exp(logits[0]) + math.exp(logits[1])))
    expected /= 2
    assert float(adapter_loss(text_probs, labels)) == pytest.approx(expected, rel=1e-12)
    # the first image: abnormal - normal = -0.05, so -log sigmoid(-0.05 / 0.07)
    one = float(adapter_loss(text_probs[:1], labels[:1]))
    assert one == pytest.approx(math.log1p(math.exp(0.05 / 0.07)), rel=1e-12)
