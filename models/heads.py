"""FiLo's trainable parts, with the module and parameter names of the official state dict.

The names (`fc`, `fc_11`, `meta_net.linear1`, ...) are the contract with the published
checkpoints (spec section 3): `FiLoHeads.state_dict()` keys equal the official ones.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# MMCI kernels in the official naming: name -> (kh, kw)
MMCI_KERNELS: OrderedDict[str, tuple[int, int]] = OrderedDict(
    fc_11=(1, 1), fc_33=(3, 3), fc_55=(5, 5), fc_77=(7, 7), fc_15=(1, 5), fc_51=(5, 1)
)
FUSED_KERNEL = 7


class LinearHeads(nn.Module):
    """`decoder_linear`: one Linear(W -> E) per QKV feature, applied to patch tokens (CLS dropped)."""

    def __init__(self, width: int, embed_dim: int, k: int = 4):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(width, embed_dim) for _ in range(k)])

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """tokens: k x (B, 1+N, W) -> k x (B, N, E)."""
        return [fc(t[:, 1:, :]) for fc, t in zip(self.fc, tokens, strict=True)]


class MMCI(nn.Module):
    """`decoder_cov`: multi-shape convolutions over the V-V patch grid (spec section 3).

    Six "same"-padded convolutions summed equal one 7x7 convolution whose kernel is their
    zero-padded sum, with the biases summed: `fused=True` runs that single convolution (about half
    the cost); `fused=False` runs the six as the released code did. tests/ prove they agree.

    Fusing pads 18 kernels to 7x7 (154 MB each at ViT-L's 1024 -> 768) and sums them, about 10 GB
    of memory traffic: 1.3 s of every inference batch on CPU, milliseconds on a GPU. So outside
    autograd the fused kernels are kept and rebuilt only when a weight changes (in-place updates
    bump a tensor's version; moves and loads give new storage).
    """

    def __init__(self, width: int, embed_dim: int, k: int = 3, fused: bool = True):
        super().__init__()
        for name, (kh, kw) in MMCI_KERNELS.items():
            convs = nn.ModuleList([nn.Conv2d(width, embed_dim, (kh, kw), padding="same") for _ in range(k)])
            setattr(self, name, convs)
        self.k = k
        self.fused = fused
        self._fused_cache: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def fused_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 7x7 kernel and bias equivalent to the six convolutions of feature i."""
        params = [p for name in MMCI_KERNELS for p in getattr(self, name)[i].parameters()]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._build_fused(i)  # training: the graph must reach the six convolutions
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cached = self._fused_cache.get(i)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, *self._build_fused(i))
            self._fused_cache[i] = cached
        return cached[1], cached[2]

    def _build_fused(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = None
        bias = None
        for name, (kh, kw) in MMCI_KERNELS.items():
            conv: nn.Conv2d = getattr(self, name)[i]
            ph, pw = (FUSED_KERNEL - kh) // 2, (FUSED_KERNEL - kw) // 2
            w = F.pad(conv.weight, (pw, pw, ph, ph))
            weight = w if weight is None else weight + w
            bias = conv.bias if bias is None else bias + conv.bias
        return weight, bias

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """tokens: k x (B, 1+N, W) with N a square grid -> k x (B, N, E)."""
        out = []
        for i, t in enumerate(tokens):
            x = t[:, 1:, :]
            b, n, w = x.shape
            g = int(round(n**0.5))
            if g * g != n:
                raise ValueError(f"{n} patch tokens do not form a square grid")
            x = x.reshape(b, g, g, w).permute(0, 3, 1, 2)
            if self.fused:
                weight, bias = self.fused_weights(i)
                y = F.conv2d(x, weight, bias, padding=FUSED_KERNEL // 2)
            else:
                y = sum(getattr(self, name)[i](x) for name in MMCI_KERNELS)
            out.append(y.permute(0, 2, 3, 1).reshape(b, n, -1))
        return out


class Adapter(nn.Module):
    """`adapter`: y = SiLU(W2 ReLU(W1 x)) + x, bottleneck E -> E/2 -> E, no biases (residual: code)."""

    def __init__(self, dim: int, reduction: int = 2):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=False),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


class PromptLearner(nn.Module):
    """CoCoOp context: n_ctx learned vectors, all shifted by meta_net(image feature).

    The shift makes every prompt, hence every text feature, depend on the image it scores.
    """

    def __init__(self, embed_dim: int, token_dim: int, n_ctx: int = 12):
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(n_ctx, token_dim).normal_(std=0.02))
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(embed_dim, embed_dim // 16),
                relu=nn.ReLU(inplace=False),
                linear2=nn.Linear(embed_dim // 16, token_dim),
            )
        )

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features: (B, E) normalised -> per-image context (B, n_ctx, token_dim)."""
        return self.ctx.unsqueeze(0) + self.meta_net(image_features).unsqueeze(1)


class FiLoHeads(nn.Module):
    """All trainable parameters of FiLo, named as in the official checkpoints."""

    def __init__(self, width: int, embed_dim: int, token_dim: int, n_ctx: int = 12, fused_mmci: bool = True):
        super().__init__()
        self.decoder_linear = LinearHeads(width, embed_dim, 4)
        self.decoder_cov = MMCI(width, embed_dim, 3, fused=fused_mmci)
        self.adapter = Adapter(embed_dim)
        self.normal_prompt_learner = PromptLearner(embed_dim, token_dim, n_ctx)
        self.abnormal_prompt_learner = PromptLearner(embed_dim, token_dim, n_ctx)
