"""`filo convert-grounding`: original / MMDetection Grounding DINO checkpoints -> transformers, exactly.

The checkpoints here are made from a tiny random transformers model by inverse mappings written for this
test (``hf_to_original``, ``original_to_mmdet``: regex rewrites from the original and MMDetection key
names, independent of the converter's rule table). Converting them back must give identical tensors and
identical forward outputs; damaged, incomplete or mis-shaped files must be refused with exit code 2.
"""

from __future__ import annotations

import re

import pytest
import torch

from models.grounding import convert_to_hf as gc
from models.grounding.detector import GroundingDetector, load_tiny_config, load_tiny_tokenizer, make_image_processor
from service.cli import main

CAPTION = "anomaly . damage . broken . scratch ."

# ------------------------------------------------------------------------------------------ fixtures


def _random_model(share: bool = True, seed: int = 5):
    from transformers import GroundingDinoForObjectDetection

    config = load_tiny_config()
    config.decoder_bbox_embed_share = share
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config).eval()
        with torch.no_grad():  # every tensor distinct and non-trivial, so a swapped pair cannot go unnoticed
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_model():
    return _random_model()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, hf_model):
    """A local --base: a tiny model + its processor written with save_pretrained."""
    from transformers import GroundingDinoProcessor

    directory = tmp_path_factory.mktemp("base")
    hf_model.save_pretrained(directory)
    GroundingDinoProcessor(image_processor=make_image_processor(), tokenizer=load_tiny_tokenizer()).save_pretrained(
        directory
    )
    return directory


# ------------------------------------------------------------------------------------------ inverse mappings

SWIN = "model.backbone.conv_encoder.model.swin."
# (transformers regex, original replacement), tried in order; q/k/v pieces are fused afterwards.
_HF_TO_ORIGINAL = [
    (r"model\.backbone\.conv_encoder\.model\.swin\.embeddings\.patch_embeddings\.projection\.", "backbone.0.patch_embed.proj."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.embeddings\.norm\.", "backbone.0.patch_embed.norm."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", r"backbone.0.layers.\1.blocks.\2.norm1."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", r"backbone.0.layers.\1.blocks.\2.norm2."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.([qkv])_proj\.", r"backbone.0.layers.\1.blocks.\2.attn.qkv.<\3>"),
    (r"model\.backbone\.conv_encoder\.model\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.", r"backbone.0.layers.\1.blocks.\2.attn.proj."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.relative_position_bias\.", r"backbone.0.layers.\1.blocks.\2.attn."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.", r"backbone.0.layers.\1.blocks.\2.mlp."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.encoder\.layers\.(\d+)\.downsample\.", r"backbone.0.layers.\1.downsample."),
    (r"model\.backbone\.conv_encoder\.model\.swin\.layernorm\.", None),  # no original counterpart
    (r"model\.input_proj_vision\.", "input_proj."),
    (r"model\.text_backbone\.", "bert."),
    (r"model\.text_projection\.", "feat_map."),
    (r"model\.level_embed$", "transformer.level_embed"),
    (r"model\.query_position_embeddings\.", "transformer.tgt_embed."),
    (r"model\.enc_output\.", "transformer.enc_output."),
    (r"model\.enc_output_norm\.", "transformer.enc_output_norm."),
    (r"model\.encoder_output_bbox_embed\.", "transformer.enc_out_bbox_embed."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.fc([12])\.", r"transformer.encoder.layers.\1.linear\2."),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn\.(query|key|value)\.(weight|bias)", r"transformer.encoder.text_layers.\1.self_attn.in_proj_\3<\2>"),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn\.out_proj\.", r"transformer.encoder.text_layers.\1.self_attn.out_proj."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc([12])\.", r"transformer.encoder.text_layers.\1.linear\2."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_before\.", r"transformer.encoder.text_layers.\1.norm1."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_after\.", r"transformer.encoder.text_layers.\1.norm2."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.vision_param$", r"transformer.encoder.fusion_layers.\1.gamma_v"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.text_param$", r"transformer.encoder.fusion_layers.\1.gamma_l"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_vision\.", r"transformer.encoder.fusion_layers.\1.layer_norm_v."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_text\.", r"transformer.encoder.fusion_layers.\1.layer_norm_l."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.(values_|out_|)vision_proj\.", r"transformer.encoder.fusion_layers.\1.attn.\2v_proj."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.(values_|out_|)text_proj\.", r"transformer.encoder.fusion_layers.\1.attn.\2l_proj."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.(query|key|value)\.(weight|bias)", r"transformer.decoder.layers.\1.self_attn.in_proj_\3<\2>"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text\.(query|key|value)\.(weight|bias)", r"transformer.decoder.layers.\1.ca_text.in_proj_\3<\2>"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text\.out_proj\.", r"transformer.decoder.layers.\1.ca_text.out_proj."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text_layer_norm\.", r"transformer.decoder.layers.\1.catext_norm."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"model\.decoder\.layers\.(\d+)\.fc([12])\.", r"transformer.decoder.layers.\1.linear\2."),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"model\.decoder\.layer_norm\.", "transformer.decoder.norm."),
    (r"model\.decoder\.reference_points_head\.", "transformer.decoder.ref_point_head."),
    (r"model\.decoder\.bbox_embed\.", "transformer.decoder.bbox_embed."),
    (r"bbox_embed\.", "bbox_embed."),
]
_ORDER = {"q": 0, "k": 1, "v": 2, "query": 0, "key": 1, "value": 2}


def _first_inverse_rule(key: str):
    for pattern, replacement in _HF_TO_ORIGINAL:
        m = re.match(pattern, key)
        if m:
            return m, replacement
    raise AssertionError(f"test inverse mapping has no rule for {key}")


def hf_to_original(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers state dict -> what the original implementation saves (buffers and pooler included)."""
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in hf_state.items():
        stage = re.fullmatch(r"model\.backbone\.conv_encoder\.model\.hidden_states_norms\.stage(\d+)\.(\w+)", key)
        if stage:  # transformers names the output norms by 1-based stage, the original by 0-based index
            out[f"backbone.0.norm{int(stage.group(1)) - 1}.{stage.group(2)}"] = tensor.clone()
            continue
        m, replacement = _first_inverse_rule(key)
        if replacement is None:
            continue
        new = m.expand(replacement) + key[m.end() :]
        fused = re.fullmatch(r"(.*)<(\w+)>(.*)", new)
        if fused:
            name = fused.group(1) + fused.group(3)
            pieces.setdefault(name, {})[_ORDER[fused.group(2)]] = tensor
        else:
            out[new] = tensor.clone()
    for name, parts in pieces.items():
        out[name] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    for key in [k for k in out if k.endswith("relative_position_bias_table")]:
        out[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(49, 49, dtype=torch.long)
    hidden = hf_state["model.text_projection.weight"].shape[1]
    out["bert.pooler.dense.weight"] = torch.randn(hidden, hidden)
    out["bert.pooler.dense.bias"] = torch.randn(hidden)
    out["bert.embeddings.position_ids"] = torch.arange(256)[None]
    return out


def _mmdet_unfold_reduction(x: torch.Tensor) -> torch.Tensor:
    """MMDetection's converter: original patch-merging channel order -> nn.Unfold's."""
    out_ch, in_ch = x.shape
    return x.reshape(out_ch, 4, in_ch // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_ch, in_ch)


def _mmdet_unfold_norm(x: torch.Tensor) -> torch.Tensor:
    (in_ch,) = x.shape
    return x.reshape(4, in_ch // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_ch)


def original_to_mmdet(original: dict[str, torch.Tensor], decoder_layers: int) -> dict[str, torch.Tensor]:
    """The renames of MMDetection's tools/model_converters/groundingdino_to_mmdet.py, restated."""
    out: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        k = key
        if k.startswith("bbox_embed."):
            k = "transformer.decoder." + k
        if k.startswith("backbone.0."):
            k = k.replace("backbone.0.", "backbone.").replace("patch_embed.proj", "patch_embed.projection")
            if ".layers." in k:
                k = k.replace("layers", "stages").replace("mlp.fc1", "ffn.layers.0.0").replace("mlp.fc2", "ffn.layers.1")
                k = k.replace(".attn.", ".attn.w_msa.")
                if "downsample.reduction" in k:
                    value = _mmdet_unfold_reduction(value)
                elif "downsample.norm" in k:
                    value = _mmdet_unfold_norm(value)
        elif k.startswith("bert."):
            k = "language_model.language_backbone.body.model." + k[len("bert.") :]
            if ".pooler." in k:
                continue  # MMDetection builds BERT with add_pooling_layer=False
        elif k.startswith("feat_map."):
            k = "text_feat_map." + k[len("feat_map.") :]
        elif k.startswith("input_proj."):
            level, sub, leaf = k.split(".")[1:]
            head = f"neck.convs.{level}" if int(level) < 3 else f"neck.extra_convs.{int(level) - 3}"
            k = f"{head}.{'conv' if sub == '0' else 'gn'}.{leaf}"
        elif k == "transformer.level_embed":
            k = "level_embed"
        elif k.startswith("transformer.encoder."):
            k = k.replace("transformer.encoder.", "encoder.").replace("norm1", "norms.0").replace("norm2", "norms.1")
            k = k.replace("linear1", "ffn.layers.0.0").replace("linear2", "ffn.layers.1")
            if "text_layers" in k and "self_attn" in k:
                k = k.replace("self_attn", "self_attn.attn")
        elif k.startswith("transformer.enc_output_norm."):
            k = k.replace("transformer.enc_output_norm", "memory_trans_norm")
        elif k.startswith("transformer.enc_output."):
            k = k.replace("transformer.enc_output", "memory_trans_fc")
        elif k.startswith("transformer.enc_out_bbox_embed.layers."):
            layer, leaf = k.split(".")[3:]
            k = f"bbox_head.reg_branches.{decoder_layers}.{2 * int(layer)}.{leaf}"
        elif k.startswith("transformer.tgt_embed."):
            k = k.replace("transformer.tgt_embed", "query_embedding")
        elif k.startswith("transformer.decoder."):
            k = k.replace("transformer.decoder.", "decoder.")
            k = k.replace("norm1", "norms.2").replace("catext_norm", "norms.1").replace("norm2", "norms.0")
            k = k.replace("norm3", "norms.3")
            if "ca_text" in k:
                k = k.replace("ca_text", "cross_attn_text.attn")
            k = k.replace("linear1", "ffn.layers.0.0").replace("linear2", "ffn.layers.1")
            k = k.replace("self_attn", "self_attn.attn")
            if "bbox_embed" in k:
                parts = k.split(".")
                k = f"bbox_head.reg_branches.{parts[2]}.{2 * int(parts[4])}.{parts[-1]}"
        out[k] = value.clone()
    out["dn_query_generator.label_embedding.weight"] = torch.randn(256, 32)
    return out


# ------------------------------------------------------------------------------------------ helpers


def _convert(tmp_path, payload, base_dir, capsys, name="ckpt.pth", extra=()):
    path = tmp_path / name
    torch.save(payload, path)
    out = tmp_path / "converted"
    rc = main(["convert-grounding", str(path), "--out", str(out), "--base", str(base_dir), *extra])
    captured = capsys.readouterr()
    return rc, out, captured.out + captured.err


def _forward(model):
    tokenizer = load_tiny_tokenizer()
    enc = tokenizer(CAPTION, return_tensors="pt")
    pixels = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc["token_type_ids"])
    return out.logits, out.pred_boxes


def _assert_identical(directory, reference) -> None:
    from transformers import GroundingDinoForObjectDetection

    model, info = GroundingDinoForObjectDetection.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected, got = reference.state_dict(), model.state_dict()
    swin_final_norm = {SWIN + "layernorm.weight", SWIN + "layernorm.bias"}
    assert set(got) == set(expected)
    differing = [k for k in expected if k not in swin_final_norm and not torch.equal(expected[k], got[k])]
    assert differing == []
    ref_logits, ref_boxes = _forward(reference)
    logits, boxes = _forward(model.eval())
    assert torch.equal(logits, ref_logits) and torch.equal(boxes, ref_boxes)


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_layout_a(tmp_path, hf_model, base_dir, capsys) -> None:
    from transformers import AutoProcessor

    rc, out, text = _convert(tmp_path, hf_to_original(hf_model.state_dict()), base_dir, capsys)
    assert rc == 0, text
    assert "layout (a)" in text
    assert "bert.pooler.dense.weight" in text and "relative_position_index" in text and "position_ids" in text
    _assert_identical(out, hf_model)
    assert (out / "model.safetensors").is_file()
    processor = AutoProcessor.from_pretrained(str(out))
    assert processor.tokenizer.vocab_size == load_tiny_tokenizer().vocab_size
    detector = GroundingDetector.from_pretrained(str(out))  # what --grounding-model DIR does
    assert len(detector.detect([torch.zeros(64, 80, 3, dtype=torch.uint8).numpy()], [["scratch"]])) == 1


def test_layout_b_with_module_prefix(tmp_path, hf_model, base_dir, capsys) -> None:
    state = {f"module.{k}": v for k, v in hf_to_original(hf_model.state_dict()).items()}
    rc, out, text = _convert(tmp_path, {"model": state, "epoch": 3}, base_dir, capsys)
    assert rc == 0, text
    assert "layout (b)" in text
    _assert_identical(out, hf_model)


def test_layout_c_mmdet(tmp_path, hf_model, base_dir, capsys) -> None:
    mmdet = original_to_mmdet(hf_to_original(hf_model.state_dict()), hf_model.config.decoder_layers)
    rc, out, text = _convert(tmp_path, {"state_dict": mmdet, "meta": {"epoch": 12}}, base_dir, capsys)
    assert rc == 0, text
    assert "layout (c)" in text and "dn_query_generator.label_embedding.weight" in text
    _assert_identical(out, hf_model)


def test_layout_c_independent_decoder_heads(tmp_path, base_dir, capsys) -> None:
    """MMDetection trains one box head per decoder layer: the output config must stop sharing them."""
    from transformers import GroundingDinoConfig

    unshared = _random_model(share=False, seed=9)
    state = unshared.state_dict()
    assert not torch.equal(state["bbox_embed.0.layers.0.weight"], state["bbox_embed.1.layers.0.weight"])
    mmdet = original_to_mmdet(hf_to_original(state), unshared.config.decoder_layers)
    rc, out, text = _convert(tmp_path, {"state_dict": mmdet}, base_dir, capsys)
    assert rc == 0, text
    assert "decoder_bbox_embed_share=false" in text
    assert GroundingDinoConfig.from_pretrained(str(out)).decoder_bbox_embed_share is False
    _assert_identical(out, unshared)


def test_differing_shared_head_copies_use_the_last_one_loaded(hf_model) -> None:
    """The original's box head is one module under 2*D names: load_state_dict leaves the last copy present."""
    original = hf_to_original(hf_model.state_dict())
    last = torch.full_like(original["bbox_embed.1.layers.0.weight"], 0.5)
    original["bbox_embed.1.layers.0.weight"] = last
    original["transformer.decoder.bbox_embed.0.layers.0.weight"] = torch.zeros_like(last)
    model_config = hf_model.config
    conversion = gc.convert_state_dict(original, "original", gc.target_shapes(hf_model), gc.model_constants(model_config))
    assert conversion.ok
    for n in range(model_config.decoder_layers):
        assert torch.equal(conversion.tensors[f"bbox_embed.{n}.layers.0.weight"], last)
        assert torch.equal(conversion.tensors[f"model.decoder.bbox_embed.{n}.layers.0.weight"], last)
    assert any("copies differ" in note for note in conversion.notes)


# ------------------------------------------------------------------------------------------ refusals


def test_missing_decoder_weight_is_refused_by_name(tmp_path, hf_model, base_dir, capsys) -> None:
    original = hf_to_original(hf_model.state_dict())
    del original["transformer.decoder.layers.1.linear1.weight"]
    rc, out, text = _convert(tmp_path, original, base_dir, capsys)
    assert rc == 2
    assert "transformer.decoder.layers.1.linear1.weight" in text
    assert "model.decoder.layers.1.fc1.weight" in text
    assert "1 tensor(s) missing from the checkpoint, leaving 1 weight(s) of the target model unfilled" in text
    assert not out.exists()


def test_missing_keys_are_named_in_the_files_own_terms(tmp_path, hf_model, base_dir, capsys) -> None:
    original = hf_to_original(hf_model.state_dict())
    del original["transformer.decoder.layers.0.self_attn.in_proj_weight"]  # one fused tensor, three weights
    rc, _, text = _convert(tmp_path, original, base_dir, capsys, name="fused.pth")
    assert rc == 2 and "1 tensor(s) missing from the checkpoint, leaving 3 weight(s)" in text
    mmdet = original_to_mmdet(hf_to_original(hf_model.state_dict()), hf_model.config.decoder_layers)
    del mmdet["decoder.layers.1.ffn.layers.1.weight"]
    del mmdet["bbox_head.reg_branches.1.4.bias"]
    rc, _, text = _convert(tmp_path, {"state_dict": mmdet}, base_dir, capsys, name="mm.pth")
    assert rc == 2
    assert "decoder.layers.1.ffn.layers.1.weight (original name transformer.decoder.layers.1.linear2.weight)" in text
    assert "bbox_head.reg_branches.1.4.bias" in text


def test_mis_shaped_tensor_is_refused_by_name(tmp_path, hf_model, base_dir, capsys) -> None:
    original = hf_to_original(hf_model.state_dict())
    original["transformer.decoder.layers.0.ca_text.in_proj_weight"] = torch.randn(90, 32)
    original["feat_map.weight"] = torch.randn(32, 48)
    rc, out, text = _convert(tmp_path, original, base_dir, capsys)
    assert rc == 2
    assert "transformer.decoder.layers.0.ca_text.in_proj_weight" in text and "(30, 32)" in text
    assert "feat_map.weight -> model.text_projection.weight: checkpoint (32, 48) vs model (32, 32)" in text
    assert not out.exists()


def test_keys_without_a_place_are_refused(tmp_path, hf_model, base_dir, capsys) -> None:
    original = hf_to_original(hf_model.state_dict())
    original["transformer.decoder.layers.7.linear1.weight"] = torch.randn(64, 32)  # a deeper decoder
    original["bbox_embed.5.layers.0.weight"] = torch.randn(32, 32)
    original["bbox_embed.0.layers.3.weight"] = torch.randn(4, 4)  # a deeper box MLP
    rc, _, text = _convert(tmp_path, original, base_dir, capsys)
    assert rc == 2
    assert "transformer.decoder.layers.7.linear1.weight" in text and "bbox_embed.5.layers.0.weight" in text
    assert "bbox_embed.0.layers.3.weight" in text


def test_nonzero_mmdet_logit_bias_is_refused(tmp_path, hf_model, base_dir, capsys) -> None:
    mmdet = original_to_mmdet(hf_to_original(hf_model.state_dict()), hf_model.config.decoder_layers)
    mmdet["bbox_head.cls_branches.0.bias"] = torch.tensor([-4.6])
    rc, _, text = _convert(tmp_path, {"state_dict": mmdet}, base_dir, capsys)
    assert rc == 2 and "bbox_head.cls_branches.0.bias" in text


@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint at all", b"PK\x03\x04truncated zip"],
    ids=["garbage", "truncated"],
)
def test_damaged_file_is_refused(tmp_path, base_dir, capsys, content) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    rc = main(["convert-grounding", str(path), "--out", str(tmp_path / "o"), "--base", str(base_dir)])
    text = capsys.readouterr().err
    assert rc == 2 and "cannot be read" in text and not (tmp_path / "o").exists()


def test_truncated_real_checkpoint_is_refused(tmp_path, hf_model, base_dir, capsys) -> None:
    path = tmp_path / "full.pth"
    torch.save(hf_to_original(hf_model.state_dict()), path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    rc = main(["convert-grounding", str(tmp_path / "cut.pth"), "--out", str(tmp_path / "o"), "--base", str(base_dir)])
    assert rc == 2 and "cannot be read" in capsys.readouterr().err


def test_not_a_state_dict_and_unknown_names_are_refused(tmp_path, base_dir, capsys) -> None:
    rc, _, text = _convert(tmp_path, [torch.zeros(2)], base_dir, capsys, name="list.pth")
    assert rc == 2 and "no state dict found" in text
    rc, _, text = _convert(tmp_path, {"encoder.weight": torch.zeros(2)}, base_dir, capsys, name="other.pth")
    assert rc == 2 and "neither Grounding DINO's original names nor MMDetection's" in text
    assert main(["convert-grounding", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "o"),
                 "--base", str(base_dir)]) == 2


def test_existing_output_and_missing_base_are_refused(tmp_path, hf_model, base_dir, capsys, monkeypatch) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(hf_to_original(hf_model.state_dict()), path)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    assert main(["convert-grounding", str(path), "--out", str(occupied), "--base", str(base_dir)]) == 2
    assert (occupied / "keep.txt").read_text() == "x"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["convert-grounding", str(path), "--out", str(tmp_path / "o"), "--base", str(tmp_path / "no-base")])
    assert rc == 2 and "--base" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ pieces


class Recorder:
    """Pickled into a checkpoint's metadata; if loading ever ran its code, ``ran`` would be set."""

    ran = False

    def __setstate__(self, state):
        Recorder.ran = True


def test_foreign_objects_beside_the_weights_never_run(tmp_path, hf_model, base_dir, capsys) -> None:
    mmdet = original_to_mmdet(hf_to_original(hf_model.state_dict()), hf_model.config.decoder_layers)
    payload = {"state_dict": mmdet, "message_hub": {"log": Recorder()}}
    path = tmp_path / "hub.pth"
    torch.save(payload, path)
    loaded, stubbed = gc.load_checkpoint(path)
    assert Recorder.ran is False
    assert any(name.endswith("Recorder") for name in stubbed)
    assert torch.equal(loaded["state_dict"]["level_embed"], mmdet["level_embed"])


def test_unfold_inverse_undoes_mmdet_order() -> None:
    weight, norm = torch.randn(8, 16), torch.randn(16)
    assert torch.equal(gc.unfold_reduction_to_original(_mmdet_unfold_reduction(weight)), weight)
    assert torch.equal(gc.unfold_norm_to_original(_mmdet_unfold_norm(norm)), norm)
    assert not torch.equal(_mmdet_unfold_reduction(weight), weight)


def test_split_qkv_and_templates() -> None:
    fused = torch.arange(12.0).reshape(6, 2)
    q, k, v = gc.split_qkv(fused)
    assert q.tolist() == [[0, 1], [2, 3]] and k.tolist() == [[4, 5], [6, 7]] and v.tolist() == [[8, 9], [10, 11]]
    with pytest.raises(ValueError):
        gc.split_qkv(torch.zeros(4, 2))
    template = gc.Template("x.stage{i+1}.{wb}", {"D": 6})
    assert template.format({"i": "2", "wb": "bias"}) == "x.stage3.bias"
    assert template.match("x.stage3.bias") == {"i": "2", "wb": "bias"}
    assert gc.Template("reg.{D}.{j}", {"D": 6}).match("reg.5.0") is None
    assert gc.Template("a.{e+B}", {"B": 3}).match("a.4") == {"e": "1"}


def test_every_target_weight_has_a_rule(hf_model) -> None:
    constants = gc.model_constants(hf_model.config)
    unnamed = [k for k in gc.target_shapes(hf_model) if gc.source_name_for(k, "original", constants).startswith("(no rule")]
    assert sorted(unnamed) == [SWIN + "layernorm.bias", SWIN + "layernorm.weight"]  # filled as identity instead
