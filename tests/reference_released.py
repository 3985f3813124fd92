"""A deliberately literal re-statement of what the released FiLo code computes, for tests only.

It is the "plain path" our optimised implementation is compared against: in-place stream updates
that alias the stored taps, explicit attention matrices, full 77-token text sequences, one image
at a time, torchvision's GaussianBlur, and the slice-assignment box suppression of the released
test script. Written from the behaviour described in ../shared/spec/filo-algorithm.md; it shares
only the weights (an open_clip model and our FiLoHeads) with the code under test.
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision

from models.prompts import abnormal_sentences, normal_sentences

RELEASED_CLIP_CONFIG = "ViT-L-14-336"  # the released factory's config for pretrained='openai' at 518


def released_clip(state_dict: dict[str, torch.Tensor] | None = None, model_name: str = RELEASED_CLIP_CONFIG,
                  image_size: int = 518, seed: int = 0) -> open_clip.CLIP:
    """The backbone as the released factory builds it for `pretrained='openai'` at a non-native size.

    `CLIP(**get_model_config('ViT-L-14-336'))`: the plain config, which has no `quick_gelu`, so the
    MLPs use nn.GELU although the OpenAI weights were trained with QuickGELU; the OpenAI state dict
    (here `state_dict`, or seeded random weights) is loaded into it and the 24x24 position grid is
    resized to 37x37 by plain bicubic (align_corners=False). Nothing of the code under test is used.
    """
    cfg = dict(open_clip.get_model_config(model_name))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    if state_dict is not None:
        model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    visual = model.visual
    pos = visual.positional_embedding.data
    old = int(round((pos.shape[0] - 1) ** 0.5))
    new = image_size // visual.conv1.kernel_size[0]
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1)
    visual.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], grid]), requires_grad=False)
    visual.grid_size = (new, new)
    visual.image_size = (image_size, image_size)
    return model.eval().requires_grad_(False)


POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]


def _attn_both(blk, x):
    """Both attentions of a surgery block on x (B, N, W): returns (vv_out, std_out), like the released pair."""
    attn = blk.attn
    b, n, w = x.shape
    heads = attn.num_heads
    qkv = x @ attn.in_proj_weight.T + attn.in_proj_bias
    qkv = qkv.reshape(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (w // heads) ** -0.5
    a = (q @ k.transpose(-2, -1)) * scale
    a = (a - a.max()).softmax(dim=-1)
    vv = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_vv = (vv @ v).transpose(1, 2).reshape(b, n, w)
    x_std = (a @ v).transpose(1, 2).reshape(b, n, w)
    proj = attn.out_proj
    return x_vv @ proj.weight.T + proj.bias, x_std @ proj.weight.T + proj.bias


@torch.no_grad()
def encode_image(visual, image, out_layers, clone_taps=False):
    """The released vision forward: returns (ln_post(all tokens) @ proj, list of tapped tokens, aliased).

    clone_taps=True stores copies instead, which gives the paper's tap layout.
    """
    first = out_layers[0]
    x = visual._embeds(image)
    out_tokens = []
    for idx, blk in enumerate(visual.transformer.resblocks, start=1):
        if idx <= first:
            x = blk(x)
        elif not isinstance(x, list):  # the first surgery block starts the two streams
            vv_res, std_res = _attn_both(blk, blk.ln_1(x))
            x_ori = x + std_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x += vv_res  # in place: grows the stored block-`first` tap into the V-V stream
            x = [x, x_ori]
        else:
            xv, x_ori = x
            vv_res, std_res = _attn_both(blk, blk.ln_1(x_ori))
            x_ori += std_res  # in place: a tap stored after the previous block absorbs this
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            xv += vv_res
            x = [xv, x_ori]
        if idx in out_layers:
            keep = (lambda t: t.clone()) if clone_taps else (lambda t: t)
            if isinstance(x, list):
                out_tokens.append(keep(x[0]))
                out_tokens.append(keep(x[1]))
            else:
                out_tokens.append(keep(x))
    final = x[1]
    pooled = visual.ln_post(final) @ visual.proj
    return pooled, out_tokens


def _text_features(clip, tokenizer, learner, img_feat, sentences):
    tokens = tokenizer(sentences)
    emb = clip.token_embedding(tokens)
    n_ctx = learner.ctx.shape[0]
    ctx = learner.ctx + learner.meta_net(img_feat)  # (n_ctx, D)
    prompts = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(sentences), -1, -1), emb[:, 1 + n_ctx:]], dim=1)
    x = prompts + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def released_forward(clip, tokenizer, heads, image, noun, descriptions, positions, out_layers, size,
                     clone_taps=False):
    """One image (1, 3, S, S). Returns (text_probs (2,), list of 7 two-channel maps (1, 2, S, S))."""
    pooled, patch_tokens = encode_image(clip.visual, image, out_layers, clone_taps)
    img = heads.adapter(pooled)[:, 0, :]  # the released code adapts every token, then keeps CLS
    img = img / img.norm(dim=-1, keepdim=True)
    nf = _text_features(clip, tokenizer, heads.normal_prompt_learner, img[0], normal_sentences(noun))
    af = _text_features(clip, tokenizer, heads.abnormal_prompt_learner, img[0], abnormal_sentences(noun, descriptions))
    nf = nf.mean(dim=0, keepdim=True)
    nf = nf / nf.norm()
    if positions:
        af = torch.cat([af[POSITIONS.index(p)::9] for p in positions], dim=0)
    af = af.mean(dim=0, keepdim=True)
    af = af / af.norm()
    text = torch.cat([nf.unsqueeze(1), af.unsqueeze(1)], dim=1)
    text = text / text.norm()
    text_probs = img.unsqueeze(1) @ text.permute(0, 2, 1)
    qkv = [heads.decoder_linear.fc[i](t[:, 1:, :]) for i, t in enumerate(patch_tokens[::2])]
    vv = []
    for i, t in enumerate(patch_tokens[1::2]):
        x = t[:, 1:, :]
        g = int(np.sqrt(x.shape[1]))
        x = x.view(x.shape[0], g, g, x.shape[2]).permute(0, 3, 1, 2)
        y = sum(getattr(heads.decoder_cov, name)[i](x) for name in ("fc_11", "fc_33", "fc_55", "fc_77", "fc_15", "fc_51"))
        vv.append(y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1]))
    maps = []
    for f in qkv + vv:
        f = f / f.norm(dim=-1, keepdim=True)
        logits = 100.0 * f @ text.transpose(-2, -1)
        b, n, _ = logits.shape
        g = int(np.sqrt(n))
        m = F.interpolate(logits.permute(0, 2, 1).view(b, 2, g, g), size=size, mode="bilinear", align_corners=True)
        maps.append(torch.softmax(m, dim=1))
    return text_probs.flatten(), maps


def released_postprocess(text_probs, maps, frame_boxes):
    """Smoothing, mean, score and box suppression exactly as the released test script does them.

    frame_boxes: xyxy floats in the frame for the VALID boxes (others never suppress anything there).
    Returns (final map (S, S) numpy, score float).
    """
    blur = torchvision.transforms.GaussianBlur(3, 4.0)
    smoothed = [blur((m[:, 1, :, :] - m[:, 0, :, :] + 1) / 2) for m in maps]
    ret = torch.mean(torch.stack(smoothed, dim=0), dim=0).unsqueeze(1)
    score = (text_probs[1].item() + ret.max().item()) / 2
    marked = ret.clone()
    for x1, y1, x2, y2 in frame_boxes:
        marked[:, :, int(y1):int(y2), int(x1):int(x2)] = 1
    final = torch.where(marked == 1, ret, ret * 0.7)
    return final[0, 0].numpy(), score
