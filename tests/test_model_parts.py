"""Unit and equivalence tests of the model parts: each optimisation against its plain path."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from descriptions import CategoryCatalog
from models import anomaly_maps as am
from models.checkpoint import apply_head_state, load_checkpoint, save_checkpoint
from models.clip_backbone import make_preprocess, resize_position_grid
from models.errors import CheckpointError
from models.heads import MMCI, MMCI_KERNELS, Adapter
from models.prompts import abnormal_sentences, build_prompt_bank, normal_sentences
from tests.conftest import random_heads, synthetic_image

CATALOG = CategoryCatalog.load()


def test_fused_mmci_equals_six_convolutions():
    torch.manual_seed(0)
    mmci = MMCI(32, 24, k=3)
    with torch.no_grad():
        for p in mmci.parameters():
            p.normal_(0, 0.1)
    tokens = [torch.randn(2, 1 + 37 * 37, 32) for _ in range(3)]
    mmci.fused = False
    plain = mmci(tokens)
    mmci.fused = True
    fused = mmci(tokens)
    for a, b in zip(plain, fused):
        assert a.shape == (2, 37 * 37, 24)
        scale = float(a.detach().abs().max())  # outputs of order 5: compare at float32 summation precision
        assert scale > 1.0
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0)


def test_fused_mmci_kernel_is_kept_until_a_weight_changes():
    torch.manual_seed(0)
    mmci, other = MMCI(16, 8, k=3), MMCI(16, 8, k=3)
    tokens = [torch.randn(2, 1 + 9 * 9, 16) for _ in range(3)]

    def plain() -> list[torch.Tensor]:
        mmci.fused = False
        try:
            return mmci(tokens)
        finally:
            mmci.fused = True

    with torch.no_grad():
        first = mmci(tokens)
        kept = mmci.fused_weights(0)[0]
        assert mmci.fused_weights(0)[0] is kept  # not rebuilt for the next batch
        mmci.fc_33[0].weight.add_(0.5)  # in place, as an optimiser step does
        stepped = mmci(tokens)
        assert mmci.fused_weights(0)[0] is not kept
        assert not torch.allclose(stepped[0], first[0], atol=1e-3)
        for a, b in zip(stepped, plain()):  # float32 summation precision at the outputs' scale
            torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=0)
        mmci.load_state_dict(other.state_dict())  # a checkpoint load
        for a, b in zip(mmci(tokens), other(tokens)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    out = mmci(tokens)  # with autograd: gradients must reach the six convolutions
    out[0].square().sum().backward()
    assert all(float(getattr(mmci, name)[0].weight.grad.abs().max()) > 0 for name in MMCI_KERNELS)


def test_adapter_has_residual():
    adapter = Adapter(16)
    with torch.no_grad():
        for p in adapter.parameters():
            p.zero_()
    x = torch.randn(3, 16)
    torch.testing.assert_close(adapter(x), x)  # f(x) = SiLU(0) = 0, so y = x only through the residual


def test_sentences_follow_released_order():
    normal = normal_sentences("pcb")
    assert normal[0] == "X X X X X X X X X X X X pcb." and normal[4] == "X X X X X X X X X X X X pcb without flaw."
    ab = abnormal_sentences("pcb", ["oxidation on the copper traces", "discoloration"])
    assert len(ab) == (2 + 5) * 9
    assert ab[0] == "X X X X X X X X X X X X abnormal pcb with oxidation on the copper traces at top left."
    assert ab[1].endswith("at top.") and ab[9].startswith("X X X X X X X X X X X X abnormal pcb with discoloration")
    assert ab[2 * 9] == "X X X X X X X X X X X X damaged pcb at top left."
    assert ab[-1] == "X X X X X X X X X X X X pcb with damage at bottom right."


def test_truncated_text_sequences_equal_full_length(tiny_model):
    """Causal text attention: cutting after the longest EOT leaves every EOT feature unchanged."""
    cat = CATALOG.get("transistor")
    m = tiny_model
    full = build_prompt_bank(cat.noun, cat.descriptions, m.tokenizer, m.clip.token_embedding, truncate=False)
    cut = build_prompt_bank(cat.noun, cat.descriptions, m.tokenizer, m.clip.token_embedding, truncate=True)
    assert full.abnormal_suffix.shape[1] + 13 == 77 and cut.abnormal_suffix.shape[1] + 13 < 40
    img = am.normalize(torch.randn(1, m.clip.text_projection.shape[1]))
    with torch.no_grad():
        t_full, s_full = m.text_features(img, [full], [None])
        t_cut, s_cut = m.text_features(img, [cut], [None])
    torch.testing.assert_close(t_full, t_cut, atol=1e-6, rtol=0)
    torch.testing.assert_close(s_full[0], s_cut[0], atol=1e-6, rtol=0)


def test_batch_equals_one_by_one_with_mixed_categories(tiny_model):
    m = tiny_model
    pre = make_preprocess(518)
    cats = [CATALOG.get("bottle"), CATALOG.get("pcb2"), CATALOG.get("bottle")]
    positions = [None, "left", "bottom"]
    images = [synthetic_image(200 + 40 * i, 260, seed=i) for i in range(3)]
    pixels = torch.stack([pre(Image.fromarray(im)) for im in images])
    banks = [m.prompt_bank(c.noun, c.descriptions) for c in cats]
    with torch.no_grad():
        batch = m(pixels, banks, positions)
        singles = [m(pixels[i:i + 1], [banks[i]], [positions[i]]) for i in range(3)]
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch.anomaly_map[i], single.anomaly_map[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.text_probs[i], single.text_probs[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(batch.type_similarity[i], single.type_similarity[0], atol=1e-6, rtol=0)
    # image-dependent text: the same category gives different text probabilities for different images
    assert not torch.allclose(batch.text_probs[0], batch.text_probs[2])


def test_description_similarity_for_one_position_is_the_sentence_cosine(tiny_model):
    m = tiny_model
    cat = CATALOG.get("zipper")
    bank = m.prompt_bank(cat.noun, cat.descriptions)
    img = am.normalize(torch.randn(1, m.clip.text_projection.shape[1]))
    with torch.no_grad():
        _, sims = m.text_features(img, [bank], ["right"])
        ctx = m.heads.abnormal_prompt_learner(img)[0]
        idx = 1 * 9 + 5  # second description, position "right"
        seq = torch.cat([bank.abnormal_prefix[idx:idx + 1], ctx[None], bank.abnormal_suffix[idx:idx + 1]], 1)
        feat = am.normalize(m.text_encoder(seq, bank.abnormal_eot[idx:idx + 1]))
    assert sims[0].shape == (len(cat.descriptions),)
    torch.testing.assert_close(sims[0][1], (feat[0] @ img[0]), atol=1e-6, rtol=0)


def test_gaussian_blur_matches_torchvision():
    x = torch.rand(2, 50, 60)
    ref = torchvision.transforms.GaussianBlur(3, 4.0)(x)
    torch.testing.assert_close(am.gaussian_blur(x), ref, atol=1e-6, rtol=0)


def test_text_matrix_rows_scaled_by_sqrt2():
    n, a = am.normalize(torch.randn(3, 8)), am.normalize(torch.randn(3, 8))
    t = am.text_matrix(n, a)
    torch.testing.assert_close(t.norm(dim=-1), torch.full((3, 2), 2 ** -0.5))


def test_suppression_and_score():
    m = torch.full((4, 4), 0.8)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[1:3, 1:3] = True
    out = am.suppress(m, keep)
    assert out[0, 0] == pytest.approx(0.56) and out[1, 1] == pytest.approx(0.8)
    assert torch.equal(am.suppress(m, None), m)
    saturated = m.clone()
    saturated[3, 3] = 1.0  # outside the box, but the released marking cannot tell it from a box pixel
    assert am.suppress(saturated, keep)[3, 3] == 1.0
    assert float(am.image_score(torch.tensor(0.2), torch.tensor(0.9))) == pytest.approx(0.55)


def test_position_grid_resize_is_plain_bicubic_not_open_clips_antialiased():
    torch.manual_seed(0)
    table = torch.randn(1 + 24 * 24, 8)
    ours = resize_position_grid(table, 37)
    grid = table[1:].reshape(1, 24, 24, 8).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, size=(37, 37), mode="bicubic", align_corners=False)
    torch.testing.assert_close(ours[1:], plain.permute(0, 2, 3, 1).reshape(-1, 8))
    torch.testing.assert_close(ours[0], table[0])
    aa = F.interpolate(grid, size=(37, 37), mode="bicubic", align_corners=False, antialias=True)
    assert (aa - plain).abs().max() > 1e-3  # why we do not let open_clip resize it


def test_preprocess_is_open_clips_eval_transform():
    image = Image.fromarray(synthetic_image(300, 500, seed=4))
    ours = make_preprocess(518)(image)
    _, _, ref_pre = open_clip.create_model_and_transforms("FiLo-Tiny-CLIP", force_image_size=518)
    torch.testing.assert_close(ours, ref_pre(image))
    assert ours.shape == (3, 518, 518)


def _official_state(clip, heads):
    state = {f"clip_model.{k}": v for k, v in list(clip.state_dict().items())[:5]}
    state["text_encoder.positional_embedding"] = clip.positional_embedding.detach()
    state.update(heads.state_dict())
    return {"filo": state}


def test_official_checkpoint_loads_with_weights_only(tmp_path, tiny_clip):
    heads = random_heads(tiny_clip, seed=9)
    path = tmp_path / "filo_official.pth"
    torch.save(_official_state(tiny_clip, heads), path)
    state, meta = load_checkpoint(path)
    assert meta["format"] == "official" and meta["tap_layout"] == "released"
    assert not any(k.startswith(("clip_model.", "text_encoder.")) for k in state)
    fresh = random_heads(tiny_clip, seed=10)
    apply_head_state(fresh, state)
    for k, v in heads.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_official_checkpoint_with_wrong_shapes_is_refused_naming_keys(tmp_path, tiny_clip):
    from models.heads import FiLoHeads

    other = FiLoHeads(96, 32, 64)  # a different backbone width
    path = tmp_path / "other.pth"
    torch.save({"filo": other.state_dict()}, path)
    state, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError) as err:
        apply_head_state(random_heads(tiny_clip), state, source=str(path))
    assert "decoder_linear.fc.0.weight" in str(err.value) and "(32, 96)" in str(err.value)


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"filo": {"x": Evil()}}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_project_checkpoint_round_trip(tmp_path, tiny_clip):
    heads = random_heads(tiny_clip, seed=11)
    meta = {"clip_model": "FiLo-Tiny-CLIP", "image_size": 518, "tap_layout": "paper", "descriptions_version": "x"}
    path = save_checkpoint(tmp_path / "ckpt.safetensors", heads, meta)
    state, read = load_checkpoint(path)
    assert read["format"] == "filo-inspect/v1" and read["tap_layout"] == "paper"
    fresh = random_heads(tiny_clip, seed=12)
    apply_head_state(fresh, state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in heads.state_dict().items())
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["filo"])["clip_model"] == "FiLo-Tiny-CLIP"


def test_build_model_refuses_mismatched_project_checkpoint(tmp_path, tiny_clip):
    from models.factory import build_model, demo_spec

    # same activation as the tiny backbone (QuickGELU), other architecture: the backbone check names it
    path = save_checkpoint(tmp_path / "c.safetensors", random_heads(tiny_clip),
                           {"clip_model": "ViT-L-14-336-quickgelu", "image_size": 518, "tap_layout": "released"})
    with pytest.raises(CheckpointError, match="clip_model"):
        build_model(demo_spec(checkpoint=str(path)))


def test_production_without_weights_fails_loudly(tmp_path, monkeypatch):
    from models.errors import WeightsNotFoundError
    from models.factory import ModelSpec, build_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    with pytest.raises(WeightsNotFoundError, match="checkpoint"):
        build_model(ModelSpec())  # no checkpoint
    ckpt = save_checkpoint(tmp_path / "c.safetensors", random_heads_for_vitl_shapes(),
                           {"clip_model": "ViT-L-14-336", "image_size": 518, "tap_layout": "released"})
    with pytest.raises(WeightsNotFoundError, match="not available on this machine"):
        build_model(ModelSpec(checkpoint=str(ckpt)), cache_dir=str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFoundError, match="neither a local file nor a pretrained tag"):
        build_model(ModelSpec(checkpoint=str(ckpt), clip_weights="/nonexistent/weights.bin"))


def random_heads_for_vitl_shapes():
    from models.heads import FiLoHeads

    return FiLoHeads(1024, 768, 768)


def test_descriptions_bundled_files_are_complete():
    mvtec = [c for c in CATALOG.names() if c in {
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut", "pill", "screw",
        "tile", "toothbrush", "transistor", "wood", "zipper"}]
    assert len(mvtec) == 15
    for name in ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                 "pcb1", "pcb2", "pcb3", "pcb4", "pipe fryum"):
        assert name in CATALOG
    assert CATALOG.get("pcb3").noun == "pcb" and CATALOG.get("macaroni2").noun == "macaroni"
    assert CATALOG.get("macaroni1").descriptions[0] == "uneven shape "  # released spacing kept
    assert CATALOG.get("hazelnut").descriptions[1] == "Unusual discoloration"  # released case kept


def test_openai_torchscript_archive_loads_into_the_named_config(tmp_path):
    """OpenAI ships CLIP as TorchScript; its tensors go into the named config (which picks the activation)."""
    from models.clip_backbone import TINY_CLIP_MODEL, BackboneSpec, create_clip, is_torchscript_archive

    source = create_clip(BackboneSpec(TINY_CLIP_MODEL, None, 224), seed=3)
    traced = torch.jit.trace_module(source, {"encode_image": torch.randn(1, 3, 224, 224)})
    path = tmp_path / "tiny-openai.pt"
    torch.jit.save(traced, str(path))
    assert is_torchscript_archive(str(path)) and not is_torchscript_archive(__file__)
    loaded = create_clip(BackboneSpec(TINY_CLIP_MODEL, str(path), 518))
    ref = source.state_dict()
    for k, v in loaded.state_dict().items():
        if k == "visual.positional_embedding":
            assert v.shape == (1 + 37 * 37, ref[k].shape[1])
            torch.testing.assert_close(v, resize_position_grid(ref[k], 37))
        else:
            assert torch.equal(v, ref[k]), k
    with pytest.raises(ValueError, match="architecture"):
        create_clip(BackboneSpec("ViT-B-16-quickgelu", str(path), 224))


def test_prompt_bank_cache_is_bounded_lru(tiny_model, monkeypatch):
    import models.filo as filo

    m = tiny_model
    assert m._banks.maxsize == filo.MAX_CACHED_CATEGORIES
    monkeypatch.setattr(m._banks, "maxsize", 2)
    saved = m.cached_banks()
    try:
        m._banks.clear()
        a = m.prompt_bank("a", ["x"])
        m.prompt_bank("b", ["y"])
        assert m.prompt_bank("a", ["x"]) is a  # a hit refreshes "a"
        m.prompt_bank("c", ["z"])  # evicts "b", the least recently used
        assert set(m.cached_banks()) == {("a", ("x",)), ("c", ("z",))}
    finally:
        monkeypatch.undo()
        m._banks.clear()
        m._banks.update(saved)
