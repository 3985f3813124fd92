"""FiLoModel: images and categories in, text probabilities, anomaly maps and type similarities out.

Tensors only. Grounding DINO (position, boxes) runs before this model and suppression after it;
both are the pipeline's business (service/engine/pipeline.py), since they need the original image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models import anomaly_maps as am
from models.dual_path import DualPathEncoder, EncoderOutput, TapLayout
from models.heads import FiLoHeads
from models.lru import LRUDict
from models.prompts import POSITIONS, PromptBank, build_prompt_bank, position_index
from models.text_encoder import PromptTextEncoder

MAX_CACHED_CATEGORIES = 256


@dataclass
class FiLoOutput:
    """text_probs (B, 2) [normal, abnormal]; anomaly_map (B, S, S) before suppression;
    type_similarity: per image, (n_descriptions,) cosine of the image with each description;
    layer_maps: with return_layer_maps, 7 x (B, 2, S, S) softmax maps before smoothing (training);
    stream: the encoder's raw stream taps, 4 x (B, 1+N, W), for few-shot reference matching."""

    text_probs: torch.Tensor
    anomaly_map: torch.Tensor
    image_features: torch.Tensor
    type_similarity: list[torch.Tensor] = field(default_factory=list)
    layer_maps: list[torch.Tensor] | None = None
    stream: list[torch.Tensor] = field(default_factory=list)


class FiLoModel(nn.Module):
    def __init__(self, clip: nn.Module, tokenizer: Callable, heads: FiLoHeads, image_size: int,
                 tap_layout: TapLayout = "released"):
        super().__init__()
        clip.requires_grad_(False)
        self.clip = clip
        self.tokenizer = tokenizer
        self.encoder = DualPathEncoder(clip.visual, tap_layout)
        self.text_encoder = PromptTextEncoder(clip)
        self.heads = heads
        self.image_size = image_size
        self.precision = "fp32"  # "bf16": autocast for the frozen encoders and the heads; maps stay fp32
        self.shared_text_prefix = True  # False: every sentence runs its whole sequence (the plain path)
        # about 10 MB per category with ViT-L: categories registered and deleted over the API must not
        # accumulate without bound
        self._banks: LRUDict[tuple[str, tuple[str, ...]], PromptBank] = LRUDict(MAX_CACHED_CATEGORIES)

    # --- configuration ------------------------------------------------------------------------
    @property
    def tap_layout(self) -> str:
        return self.encoder.tap_layout

    @property
    def n_ctx(self) -> int:
        return self.heads.normal_prompt_learner.n_ctx

    @property
    def device(self) -> torch.device:
        return self.heads.adapter.fc[0].weight.device

    def _low_precision(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _full_precision(self):
        return torch.autocast(self.device.type, enabled=False)

    # --- per-category text cache ---------------------------------------------------------------
    def prompt_bank(self, noun: str, descriptions: Sequence[str]) -> PromptBank:
        """The category's tokenised prompts (cached, least recently used first out: text-only work)."""
        key = (noun, tuple(descriptions))
        bank = self._banks.get(key)
        if bank is None:
            bank = self._banks[key] = build_prompt_bank(
                noun, descriptions, self.tokenizer, self.clip.token_embedding, self.n_ctx
            ).to(self.device)
        return bank

    def put_prompt_bank(self, noun: str, descriptions: Sequence[str], bank: PromptBank) -> None:
        """Install a bank restored from a persisted cache (a restarted pod skips tokenisation)."""
        self._banks[(noun, tuple(descriptions))] = bank.to(self.device)

    def cached_banks(self) -> dict[tuple[str, tuple[str, ...]], PromptBank]:
        return dict(self._banks)

    # --- image side ------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, encoder: Callable[[torch.Tensor], EncoderOutput] | None = None
                      ) -> EncoderOutput:
        """The dual-path encoder's taps; `encoder` runs instead of `self.encoder` where a caller holds a compiled
        or bucketed form of it (the module itself is never replaced)."""
        with torch.no_grad(), self._low_precision():
            return (encoder if encoder is not None else self.encoder)(images)

    def image_features(self, enc: EncoderOutput, with_adapter: bool = True) -> torch.Tensor:
        feats = enc.global_feature.float()
        with self._full_precision():
            if with_adapter:
                feats = self.heads.adapter(feats)
            return am.normalize(feats)

    # --- text side -------------------------------------------------------------------------------
    def text_features(self, image_features: torch.Tensor, banks: Sequence[PromptBank],
                      positions: Sequence[str | None]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per image: T (B, 2, E) and the per-description similarities.

        All images' sentences go through the text transformer in one call; sequences are padded
        after their EOT only, which the causal mask makes invisible. With `shared_text_prefix` the
        SOT + context prefix runs once per image and state (text_encoder.py says why that is exact).
        """
        ctx_n = self.heads.normal_prompt_learner(image_features)
        ctx_a = self.heads.abnormal_prompt_learner(image_features)
        prefixes: list[torch.Tensor] = []  # 2 per image: SOT + its normal / abnormal context
        suffixes: list[torch.Tensor] = []
        groups: list[torch.Tensor] = []
        eots: list[torch.Tensor] = []
        spans: list[tuple[int, int, torch.Tensor]] = []  # (start, n_normal, abnormal sentence idx)
        start = 0
        for i, (bank, pos) in enumerate(zip(banks, positions, strict=True)):
            sel = _abnormal_selection(bank, pos)
            n_norm = bank.normal_eot.shape[0]
            prefixes += [_context_prefix(bank.normal_prefix[:1], ctx_n[i]),
                         _context_prefix(bank.abnormal_prefix[:1], ctx_a[i])]
            suffixes += [bank.normal_suffix, bank.abnormal_suffix[sel]]
            dev = bank.normal_eot.device  # made on the device: a host tensor copied over would sync the stream
            groups += [torch.full((n_norm,), 2 * i, device=dev), torch.full((sel.numel(),), 2 * i + 1, device=dev)]
            eots += [bank.normal_eot, bank.abnormal_eot[sel]]
            spans.append((start, n_norm, sel))
            start += n_norm + sel.numel()
        length = max(s.shape[1] for s in suffixes)
        suffix = torch.cat([nn.functional.pad(s, (0, 0, 0, length - s.shape[1])) for s in suffixes], dim=0)
        prefix = torch.cat(prefixes, dim=0)
        group = torch.cat(groups)
        with self._low_precision():
            if self.shared_text_prefix:
                encoded = self.text_encoder.forward_shared_prefix(prefix, suffix, group, torch.cat(eots))
            else:
                encoded = self.text_encoder(torch.cat([prefix[group], suffix], dim=1), torch.cat(eots))
        feats = am.normalize(encoded.float())
        texts, type_sims = [], []
        for i, ((s0, n_norm, sel), bank) in enumerate(zip(spans, banks, strict=True)):
            normal = am.normalize(feats[s0:s0 + n_norm].mean(dim=0))
            abnormal_sent = feats[s0 + n_norm:s0 + n_norm + sel.numel()]
            abnormal = am.normalize(abnormal_sent.mean(dim=0))
            texts.append(am.text_matrix(normal[None], abnormal[None])[0])
            type_sims.append(_description_similarity(image_features[i], abnormal_sent, bank, sel))
        return torch.stack(texts), type_sims

    # --- maps ------------------------------------------------------------------------------------
    def maps(self, enc: EncoderOutput, text: torch.Tensor,
             return_layer_maps: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        with self._low_precision():
            feats = self.heads.decoder_linear(enc.qkv) + self.heads.decoder_cov(enc.vv)
        with self._full_precision():
            two_ch = [am.two_channel_map(f.float(), text.float(), self.image_size) for f in feats]
            anomaly_map = am.combine_maps([am.layer_anomaly_map(m) for m in two_ch])
        return anomaly_map, (two_ch if return_layer_maps else None)

    def forward(self, images: torch.Tensor, banks: Sequence[PromptBank], positions: Sequence[str | None],
                with_adapter: bool = True, return_layer_maps: bool = False,
                encoder: Callable[[torch.Tensor], EncoderOutput] | None = None) -> FiLoOutput:
        """images (B, 3, S, S) preprocessed; one bank and one position (None = all nine) per image; `encoder` as
        in `encode_images`."""
        enc = self.encode_images(images, encoder)
        img = self.image_features(enc, with_adapter)
        text, type_sims = self.text_features(img, banks, positions)
        with self._full_precision():
            text_probs = (img[:, None, :].float() @ text.transpose(1, 2).float())[:, 0]
        anomaly_map, layer_maps = self.maps(enc, text, return_layer_maps)
        return FiLoOutput(text_probs, anomaly_map, img, type_sims, layer_maps, enc.stream)


def _abnormal_selection(bank: PromptBank, position: str | None) -> torch.Tensor:
    """Indices of the abnormal sentences of one position (s*9 + p), or all of them."""
    n = bank.abnormal_eot.shape[0]
    device = bank.abnormal_eot.device
    if position is None:
        return torch.arange(n, device=device)
    return torch.arange(position_index(position), n, len(POSITIONS), device=device)


def _context_prefix(sot: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """(1, 1 + n_ctx, D): the SOT embedding then one image's context vectors, the start of every sentence."""
    return torch.cat([sot, ctx.unsqueeze(0).to(sot.dtype)], dim=1)


def _description_similarity(image_feature: torch.Tensor, abnormal_sent: torch.Tensor, bank: PromptBank,
                            sel: torch.Tensor) -> torch.Tensor:
    """Cosine of the image with each fine-grained description's (position-averaged) sentence feature."""
    n_pos = sel.numel() // bank.n_abnormal_states
    per_state = abnormal_sent.reshape(bank.n_abnormal_states, n_pos, -1)[: bank.n_descriptions]
    desc = am.normalize(per_state.mean(dim=1))
    return desc @ image_feature
