"""FiLo's training losses, in the exact forms of the released code (spec section 8).

The released code trains its segmentation side with a focal loss and two dice losses on every one of
the seven 2-channel softmax maps, and its adapter with a temperature-scaled cross-entropy on the
image-level text probabilities. The small details (the clamped one-hot target, the `+ 1e-5` on p_t,
the `+ 1` smoothing of the dice) change the numbers a checkpoint is trained to, so they are kept
verbatim rather than replaced by library losses that look equivalent.

All functions are pure tensor functions: no module state, tested alone (tests/test_losses.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0
ADAPTER_TEMPERATURE = 0.07


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = FOCAL_GAMMA,
               smooth: float = FOCAL_SMOOTH) -> torch.Tensor:
    """Focal loss of a C-channel probability map against a class-index mask (released form).

    probs (B, C, H, W) softmax probabilities (not logits); mask (B, H, W) or (B, 1, H, W) with class
    indices (0 normal, 1 abnormal for FiLo). The one-hot target is clamped to
    [smooth / (C - 1), 1 - smooth], p_t = sum_c(one_hot * p) + smooth and the loss is the mean over
    all pixels of -(1 - p_t)^gamma * log p_t. No alpha weighting (the released alpha is all ones).
    Returns a scalar.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be (B, C, H, W), got {tuple(probs.shape)}")
    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match probs {tuple(probs.shape)}")
    n_class = probs.shape[1]
    one_hot = F.one_hot(mask.long(), n_class).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot.clamp(smooth / (n_class - 1), 1.0 - smooth)
    p_t = (one_hot * probs).sum(dim=1) + smooth
    return (-((1.0 - p_t) ** gamma) * p_t.log()).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Binary dice loss, 1 - (2 sum(p y) + smooth) / (sum p + sum y + smooth) per sample, batch mean.

    probs and target share a shape (B, ...); each sample is flattened. Returns a scalar.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ in shape")
    p = probs.reshape(probs.shape[0], -1)
    y = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * y).sum(dim=1) + smooth) / (p.sum(dim=1) + y.sum(dim=1) + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(layer_maps: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Phase-1 loss: sum over the maps of focal + dice(abnormal, mask) + dice(normal, 1 - mask).

    layer_maps: the model's 7 x (B, 2, S, S) softmax maps before smoothing (channel 0 normal,
    1 abnormal); mask (B, S, S) in {0, 1}. Returns the loss and its parts (floats, for the log).
    """
    if not layer_maps:
        raise ValueError("no layer maps to train on")
    mask = mask.to(layer_maps[0].dtype)
    focal = layer_maps[0].new_zeros(())
    dice = layer_maps[0].new_zeros(())
    for probs in layer_maps:
        focal = focal + focal_loss(probs, mask)
        dice = dice + dice_loss(probs[:, 1], mask) + dice_loss(probs[:, 0], 1.0 - mask)
    total = focal + dice
    return total, {"focal": float(focal.detach()), "dice": float(dice.detach())}


def adapter_loss(text_probs: torch.Tensor, labels: torch.Tensor,
                 temperature: float = ADAPTER_TEMPERATURE) -> torch.Tensor:
    """Phase-2 loss: cross-entropy of text_probs / temperature against the image labels.

    text_probs (B, 2) [normal, abnormal] cosines (no softmax, as the model returns them); labels (B,)
    0 normal, 1 anomalous. Returns a scalar (batch mean).
    """
    return F.cross_entropy(text_probs / temperature, labels.long())
