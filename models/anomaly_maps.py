"""Pure tensor functions from features to FiLo's anomaly map and image score (spec sections 4, 5, 7).

Each function is tested alone; `FiLoModel` only strings them together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SUPPRESSION_LAMBDA = 0.7
GAUSSIAN_KERNEL = 3
GAUSSIAN_SIGMA = 4.0


def normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True)


def text_matrix(normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """(B, E) normalised F_n, F_a -> T (B, 2, E), divided by its Frobenius norm (code): rows / sqrt 2."""
    t = torch.stack([normal, abnormal], dim=1)
    return t / t.flatten(1).norm(dim=-1)[:, None, None]


def two_channel_map(patch_features: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
    """patch_features (B, N, E), T (B, 2, E) -> softmax maps (B, 2, size, size).

    100 * cosine logits on the patch grid, bilinear (align_corners=True) to the frame, then the
    softmax over the normal/abnormal channels, in that order as the released code does.
    """
    b, n, _ = patch_features.shape
    g = int(round(math.sqrt(n)))
    logits = 100.0 * normalize(patch_features) @ text.transpose(1, 2)  # (B, N, 2)
    logits = logits.permute(0, 2, 1).reshape(b, 2, g, g)
    logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=True)
    return logits.softmax(dim=1)


def gaussian_kernel1d(kernel_size: int = GAUSSIAN_KERNEL, sigma: float = GAUSSIAN_SIGMA,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """torchvision.transforms.GaussianBlur's kernel: exp(-x^2 / 2 sigma^2) on integer offsets, normalised.

    Built on `device` itself: a kernel made on the host and copied would make the GPU stream wait.
    """
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, device=device)
    k = torch.exp(-0.5 * (x / sigma).pow(2))
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, kernel_size: int = GAUSSIAN_KERNEL, sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """(B, H, W) -> (B, H, W), separable Gaussian with reflect padding (torchvision's GaussianBlur)."""
    k1 = gaussian_kernel1d(kernel_size, sigma, maps.device).to(dtype=maps.dtype)
    kernel = (k1[:, None] * k1[None, :])[None, None]
    pad = kernel_size // 2
    x = F.pad(maps[:, None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, kernel)[:, 0]


def layer_anomaly_map(two_channel: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) softmax -> (B, H, W) smoothed (abnormal - normal + 1) / 2."""
    return gaussian_blur((two_channel[:, 1] - two_channel[:, 0] + 1) / 2)


def combine_maps(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the per-feature maps (code; the paper's Eq. 3-4 weight them differently)."""
    return torch.stack(per_layer, dim=0).mean(dim=0)


def suppress(anomaly_map: torch.Tensor, keep: torch.Tensor | None,
             lam: float = SUPPRESSION_LAMBDA) -> torch.Tensor:
    """HQ-Loc: pixels outside every valid box are multiplied by lambda (spec section 6).

    keep: (..., H, W) bool, True inside a valid box; all False multiplies the whole map (code);
    None means no suppression at all (grounding switched off).
    Pixels whose value is exactly 1.0 are kept too (code): the released script marks box pixels
    by writing 1 into a copy of the map and keeps every pixel where that copy equals 1, which a
    saturated map value also does.
    """
    if keep is None:
        return anomaly_map
    return torch.where(keep | (anomaly_map == 1), anomaly_map, anomaly_map * lam)


def image_score(text_abnormal: torch.Tensor, map_max: torch.Tensor) -> torch.Tensor:
    """(text_probs[abnormal] + max of the map before suppression) / 2 (code: no softmax)."""
    return (text_abnormal + map_max) / 2
