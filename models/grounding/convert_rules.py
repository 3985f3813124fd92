"""The key mapping of ``filo convert-grounding``, as data: read this beside ``models/grounding/convert_to_hf.py``.

Three tables and two lists, applied in this order to a checkpoint's tensors:

1. ``MMDET_TO_ORIGINAL`` (layout (c) only): MMDetection's GroundingDINO names -> the original
   IDEA-Research names. It inverts MMDetection's ``tools/model_converters/groundingdino_to_mmdet.py``,
   including the patch-merging channel order of MMDetection's ``nn.Unfold`` (ops ``unfold_reduction`` and
   ``unfold_norm``).
2. ``DROPPED`` / ``MMDET_DROPPED``: keys left out on purpose, each with the reason it is safe.
3. ``ORIGINAL_TO_HF``: original names (what ``groundingdino_swint_ogc.pth`` and FiLo's ``test.py`` use)
   -> ``transformers``' ``GroundingDinoForObjectDetection``. Op ``qkv`` splits a fused in-projection
   (rows ``[q; k; v]``, as ``nn.MultiheadAttention`` and Swin's ``attn.qkv`` store it) into three.
4. ``DECODER_BOX_HEAD``: the decoder's box MLP, which the original stores under several names.
5. ``FILLED_WITHOUT_SOURCE``: target weights with no counterpart in any layout, and why that is harmless.

Patterns: ``{i}``, ``{j}``, ``{k}``, ``{n}`` match a decimal index, ``{wb}`` matches ``weight`` or
``bias``, ``{rest}`` matches the rest of a key (dots included). A target may compute an index:
``{i+1}``, ``{j//2}``, ``{e+B}``. Upper-case names are constants of the model being converted:
``D`` = decoder layers, ``B`` = backbone feature levels (``len(out_indices)``). The first rule whose
source pattern matches a whole key wins. Sources of these names: IDEA-Research/GroundingDINO
(``groundingdino/models/GroundingDINO/``), transformers' ``modeling_grounding_dino.py`` and
``convert_grounding_dino_to_hf.py``, MMDetection's ``grounding_dino.py`` and ``grounding_dino_layers.py``.
"""

from __future__ import annotations

# (source pattern, target pattern or tuple of targets, op). Ops: "copy", "qkv", "unfold_reduction", "unfold_norm".
Rule = tuple[str, str | tuple[str, ...], str]

SWIN = "model.backbone.conv_encoder.model.swin"
SWIN_BACKBONE = "model.backbone.conv_encoder.model"
_QKV_SWIN = ("q_proj", "k_proj", "v_proj")

# --------------------------------------------------------------------------------------------------
# Original IDEA-Research GroundingDINO -> transformers GroundingDinoForObjectDetection
# --------------------------------------------------------------------------------------------------

_SWIN_BLOCK = "backbone.0.layers.{i}.blocks.{j}"
_HF_BLOCK = SWIN + ".encoder.layers.{i}.blocks.{j}"
_ENC = "transformer.encoder"
_DEC = "transformer.decoder.layers.{i}"
_HF_DEC = "model.decoder.layers.{i}"

ORIGINAL_TO_HF: tuple[Rule, ...] = (
    # Swin-T image backbone (backbone.0; backbone.1 is the parameter-free sine position embedding).
    ("backbone.0.patch_embed.proj.{wb}", SWIN + ".embeddings.patch_embeddings.projection.{wb}", "copy"),
    ("backbone.0.patch_embed.norm.{wb}", SWIN + ".embeddings.norm.{wb}", "copy"),
    (_SWIN_BLOCK + ".norm1.{wb}", _HF_BLOCK + ".layernorm_before.{wb}", "copy"),
    (_SWIN_BLOCK + ".norm2.{wb}", _HF_BLOCK + ".layernorm_after.{wb}", "copy"),
    (_SWIN_BLOCK + ".attn.qkv.{wb}", tuple(_HF_BLOCK + f".attention.{p}.{{wb}}" for p in _QKV_SWIN), "qkv"),
    (_SWIN_BLOCK + ".attn.proj.{wb}", _HF_BLOCK + ".attention.o_proj.{wb}", "copy"),
    (
        _SWIN_BLOCK + ".attn.relative_position_bias_table",
        _HF_BLOCK + ".attention.relative_position_bias.relative_position_bias_table",
        "copy",
    ),
    (_SWIN_BLOCK + ".mlp.fc1.{wb}", _HF_BLOCK + ".mlp.fc1.{wb}", "copy"),
    (_SWIN_BLOCK + ".mlp.fc2.{wb}", _HF_BLOCK + ".mlp.fc2.{wb}", "copy"),
    # Patch merging closes stage i in both implementations (same index); norm before reduction in both.
    ("backbone.0.layers.{i}.downsample.reduction.weight", SWIN + ".encoder.layers.{i}.downsample.reduction.weight", "copy"),
    ("backbone.0.layers.{i}.downsample.norm.{wb}", SWIN + ".encoder.layers.{i}.downsample.norm.{wb}", "copy"),
    # Output norms: the original names them by 0-based stage index (norm1..norm3 for out_indices 1,2,3),
    # transformers by 1-based stage name (stage2..stage4).
    ("backbone.0.norm{i}.{wb}", SWIN_BACKBONE + ".hidden_states_norms.stage{i+1}.{wb}", "copy"),
    # Projections of the image feature levels (1x1 conv + GroupNorm; the last level a 3x3 stride-2 conv).
    ("input_proj.{i}.{j}.{wb}", "model.input_proj_vision.{i}.{j}.{wb}", "copy"),
    # BERT text encoder (pooler and buffers are in DROPPED, which is applied first) and its projection.
    ("bert.{rest}", "model.text_backbone.{rest}", "copy"),
    ("feat_map.{wb}", "model.text_projection.{wb}", "copy"),
    # Level and query embeddings, two-stage proposal generation.
    ("transformer.level_embed", "model.level_embed", "copy"),
    ("transformer.tgt_embed.weight", "model.query_position_embeddings.weight", "copy"),
    ("transformer.enc_output.{wb}", "model.enc_output.{wb}", "copy"),
    ("transformer.enc_output_norm.{wb}", "model.enc_output_norm.{wb}", "copy"),
    ("transformer.enc_out_bbox_embed.layers.{i}.{wb}", "model.encoder_output_bbox_embed.layers.{i}.{wb}", "copy"),
    # Encoder, image side: deformable self-attention layers.
    (_ENC + ".layers.{i}.self_attn.{rest}", "model.encoder.layers.{i}.deformable_layer.self_attn.{rest}", "copy"),
    (_ENC + ".layers.{i}.norm1.{wb}", "model.encoder.layers.{i}.deformable_layer.self_attn_layer_norm.{wb}", "copy"),
    (_ENC + ".layers.{i}.linear1.{wb}", "model.encoder.layers.{i}.deformable_layer.fc1.{wb}", "copy"),
    (_ENC + ".layers.{i}.linear2.{wb}", "model.encoder.layers.{i}.deformable_layer.fc2.{wb}", "copy"),
    (_ENC + ".layers.{i}.norm2.{wb}", "model.encoder.layers.{i}.deformable_layer.final_layer_norm.{wb}", "copy"),
    # Encoder, text side: the text enhancer (nn.MultiheadAttention with a fused in-projection).
    (
        _ENC + ".text_layers.{i}.self_attn.in_proj_{wb}",
        tuple(f"model.encoder.layers.{{i}}.text_enhancer_layer.self_attn.{p}.{{wb}}" for p in ("query", "key", "value")),
        "qkv",
    ),
    (
        _ENC + ".text_layers.{i}.self_attn.out_proj.{wb}",
        "model.encoder.layers.{i}.text_enhancer_layer.self_attn.out_proj.{wb}",
        "copy",
    ),
    (_ENC + ".text_layers.{i}.linear1.{wb}", "model.encoder.layers.{i}.text_enhancer_layer.fc1.{wb}", "copy"),
    (_ENC + ".text_layers.{i}.linear2.{wb}", "model.encoder.layers.{i}.text_enhancer_layer.fc2.{wb}", "copy"),
    (_ENC + ".text_layers.{i}.norm1.{wb}", "model.encoder.layers.{i}.text_enhancer_layer.layer_norm_before.{wb}", "copy"),
    (_ENC + ".text_layers.{i}.norm2.{wb}", "model.encoder.layers.{i}.text_enhancer_layer.layer_norm_after.{wb}", "copy"),
    # Encoder, image-text fusion (bi-attention block with layer-scale gammas).
    (_ENC + ".fusion_layers.{i}.gamma_v", "model.encoder.layers.{i}.fusion_layer.vision_param", "copy"),
    (_ENC + ".fusion_layers.{i}.gamma_l", "model.encoder.layers.{i}.fusion_layer.text_param", "copy"),
    (_ENC + ".fusion_layers.{i}.layer_norm_v.{wb}", "model.encoder.layers.{i}.fusion_layer.layer_norm_vision.{wb}", "copy"),
    (_ENC + ".fusion_layers.{i}.layer_norm_l.{wb}", "model.encoder.layers.{i}.fusion_layer.layer_norm_text.{wb}", "copy"),
    (_ENC + ".fusion_layers.{i}.attn.v_proj.{wb}", "model.encoder.layers.{i}.fusion_layer.attn.vision_proj.{wb}", "copy"),
    (_ENC + ".fusion_layers.{i}.attn.l_proj.{wb}", "model.encoder.layers.{i}.fusion_layer.attn.text_proj.{wb}", "copy"),
    (
        _ENC + ".fusion_layers.{i}.attn.values_v_proj.{wb}",
        "model.encoder.layers.{i}.fusion_layer.attn.values_vision_proj.{wb}",
        "copy",
    ),
    (
        _ENC + ".fusion_layers.{i}.attn.values_l_proj.{wb}",
        "model.encoder.layers.{i}.fusion_layer.attn.values_text_proj.{wb}",
        "copy",
    ),
    (_ENC + ".fusion_layers.{i}.attn.out_v_proj.{wb}", "model.encoder.layers.{i}.fusion_layer.attn.out_vision_proj.{wb}", "copy"),
    (_ENC + ".fusion_layers.{i}.attn.out_l_proj.{wb}", "model.encoder.layers.{i}.fusion_layer.attn.out_text_proj.{wb}", "copy"),
    # Decoder layers. Original order: self-attn (norm2), text cross-attn (catext_norm),
    # deformable image cross-attn (norm1), FFN (norm3).
    (_DEC + ".self_attn.in_proj_{wb}", tuple(_HF_DEC + f".self_attn.{p}.{{wb}}" for p in ("query", "key", "value")), "qkv"),
    (_DEC + ".self_attn.out_proj.{wb}", _HF_DEC + ".self_attn.out_proj.{wb}", "copy"),
    (_DEC + ".norm2.{wb}", _HF_DEC + ".self_attn_layer_norm.{wb}", "copy"),
    (
        _DEC + ".ca_text.in_proj_{wb}",
        tuple(_HF_DEC + f".encoder_attn_text.{p}.{{wb}}" for p in ("query", "key", "value")),
        "qkv",
    ),
    (_DEC + ".ca_text.out_proj.{wb}", _HF_DEC + ".encoder_attn_text.out_proj.{wb}", "copy"),
    (_DEC + ".catext_norm.{wb}", _HF_DEC + ".encoder_attn_text_layer_norm.{wb}", "copy"),
    (_DEC + ".cross_attn.{rest}", _HF_DEC + ".encoder_attn.{rest}", "copy"),
    (_DEC + ".norm1.{wb}", _HF_DEC + ".encoder_attn_layer_norm.{wb}", "copy"),
    (_DEC + ".linear1.{wb}", _HF_DEC + ".fc1.{wb}", "copy"),
    (_DEC + ".linear2.{wb}", _HF_DEC + ".fc2.{wb}", "copy"),
    (_DEC + ".norm3.{wb}", _HF_DEC + ".final_layer_norm.{wb}", "copy"),
    ("transformer.decoder.norm.{wb}", "model.decoder.layer_norm.{wb}", "copy"),
    ("transformer.decoder.ref_point_head.layers.{i}.{wb}", "model.decoder.reference_points_head.layers.{i}.{wb}", "copy"),
)

# The decoder's box MLP (3 linear layers). In the original SwinT-OGC model (dec_pred_bbox_embed_share=True) it
# is ONE module registered as transformer.decoder.bbox_embed.{n} and bbox_embed.{n} for every decoder layer n;
# load_state_dict visits those names in the order below (the transformer is registered before bbox_embed) and
# the last present copy is what the model ends up with. transformers ties bbox_embed.{n} and
# model.decoder.bbox_embed.{n} the same way. MMDetection keeps one independent head per layer
# (bbox_head.reg_branches.{n}, renamed to bbox_embed.{n} by MMDET_TO_ORIGINAL).
DECODER_BOX_HEAD = {
    "sources_in_load_order": ("transformer.decoder.bbox_embed.{n}.layers.{k}.{wb}", "bbox_embed.{n}.layers.{k}.{wb}"),
    "targets": ("bbox_embed.{n}.layers.{k}.{wb}", "model.decoder.bbox_embed.{n}.layers.{k}.{wb}"),
}

# (pattern, reason). Applied before ORIGINAL_TO_HF; every key matching one is dropped and reported.
DROPPED: tuple[tuple[str, str], ...] = (
    (
        "bert.pooler.dense.{wb}",
        "BERT's pooler: Grounding DINO reads only BERT's last hidden state, and transformers builds its "
        "text backbone without a pooler (add_pooling_layer=False), so nothing would load it",
    ),
    (
        "bert.embeddings.position_ids",
        "a buffer holding 0..max_position-1, not a weight; Grounding DINO passes its own per-phrase "
        "position ids and transformers rebuilds this buffer",
    ),
    (
        "bert.embeddings.token_type_ids",
        "a buffer of zeros, not a weight; transformers rebuilds it",
    ),
    (
        "backbone.0.layers.{i}.blocks.{j}.attn.relative_position_index",
        "a buffer computed from the window size (same formula in both implementations); transformers "
        "recomputes it, only relative_position_bias_table is learned",
    ),
    (
        "backbone.0.layers.{i}.blocks.{j}.attn_mask",
        "the shifted-window attention mask, a function of the input size recomputed at run time",
    ),
    (
        "backbone.0.layers.{i}.attn_mask",
        "the shifted-window attention mask, a function of the input size recomputed at run time",
    ),
)

# Target weights no layout has; (pattern, fill, reason). Filled with the value that makes them an identity.
FILLED_WITHOUT_SOURCE: tuple[tuple[str, str, str], ...] = (
    (
        SWIN + ".layernorm.weight",
        "ones",
        "the final LayerNorm of transformers' SwinModel: SwinBackbone computes it but returns the per-stage "
        "hidden_states_norms outputs instead, so it never reaches Grounding DINO (transformers lists it in "
        "_keys_to_ignore_on_load_missing); the original Swin has no such norm",
    ),
    (
        SWIN + ".layernorm.bias",
        "zeros",
        "the final LayerNorm of transformers' SwinModel, unused by SwinBackbone (see its weight)",
    ),
)

# --------------------------------------------------------------------------------------------------
# MMDetection GroundingDINO -> original IDEA-Research names (layout (c))
# --------------------------------------------------------------------------------------------------

_MM_BLOCK = "backbone.stages.{i}.blocks.{j}"

MMDET_TO_ORIGINAL: tuple[Rule, ...] = (
    # Swin backbone
    ("backbone.patch_embed.projection.{wb}", "backbone.0.patch_embed.proj.{wb}", "copy"),
    ("backbone.patch_embed.norm.{wb}", "backbone.0.patch_embed.norm.{wb}", "copy"),
    (_MM_BLOCK + ".attn.w_msa.{rest}", _SWIN_BLOCK + ".attn.{rest}", "copy"),
    (_MM_BLOCK + ".ffn.layers.0.0.{wb}", _SWIN_BLOCK + ".mlp.fc1.{wb}", "copy"),
    (_MM_BLOCK + ".ffn.layers.1.{wb}", _SWIN_BLOCK + ".mlp.fc2.{wb}", "copy"),
    (_MM_BLOCK + ".norm{k}.{wb}", _SWIN_BLOCK + ".norm{k}.{wb}", "copy"),
    # MMDetection's PatchMerging gathers the 2x2 neighbourhood with nn.Unfold: channel c*4+s instead of
    # the original's s'*C+c with s' in (0,0),(1,0),(0,1),(1,1) order. The ops undo that permutation.
    ("backbone.stages.{i}.downsample.reduction.weight", "backbone.0.layers.{i}.downsample.reduction.weight", "unfold_reduction"),
    ("backbone.stages.{i}.downsample.norm.{wb}", "backbone.0.layers.{i}.downsample.norm.{wb}", "unfold_norm"),
    ("backbone.norm{i}.{wb}", "backbone.0.norm{i}.{wb}", "copy"),
    # Text encoder and projection
    ("language_model.language_backbone.body.model.{rest}", "bert.{rest}", "copy"),
    ("text_feat_map.{wb}", "feat_map.{wb}", "copy"),
    # Neck = input projections; MMDetection splits off the extra stride-2 level(s) as extra_convs.
    ("neck.convs.{i}.conv.{wb}", "input_proj.{i}.0.{wb}", "copy"),
    ("neck.convs.{i}.gn.{wb}", "input_proj.{i}.1.{wb}", "copy"),
    ("neck.extra_convs.{e}.conv.{wb}", "input_proj.{e+B}.0.{wb}", "copy"),
    ("neck.extra_convs.{e}.gn.{wb}", "input_proj.{e+B}.1.{wb}", "copy"),
    # Embeddings and two-stage proposal generation
    ("level_embed", "transformer.level_embed", "copy"),
    ("query_embedding.weight", "transformer.tgt_embed.weight", "copy"),
    ("memory_trans_fc.{wb}", "transformer.enc_output.{wb}", "copy"),
    ("memory_trans_norm.{wb}", "transformer.enc_output_norm.{wb}", "copy"),
    # Box heads: reg_branches.{D} is the encoder-output head, 0..D-1 the decoder's (Linear at 0, 2, 4).
    ("bbox_head.reg_branches.{D}.{j}.{wb}", "transformer.enc_out_bbox_embed.layers.{j//2}.{wb}", "copy"),
    ("bbox_head.reg_branches.{i}.{j}.{wb}", "bbox_embed.{i}.layers.{j//2}.{wb}", "copy"),
    # Encoder
    ("encoder.layers.{i}.self_attn.{rest}", _ENC + ".layers.{i}.self_attn.{rest}", "copy"),
    ("encoder.layers.{i}.norms.0.{wb}", _ENC + ".layers.{i}.norm1.{wb}", "copy"),
    ("encoder.layers.{i}.norms.1.{wb}", _ENC + ".layers.{i}.norm2.{wb}", "copy"),
    ("encoder.layers.{i}.ffn.layers.0.0.{wb}", _ENC + ".layers.{i}.linear1.{wb}", "copy"),
    ("encoder.layers.{i}.ffn.layers.1.{wb}", _ENC + ".layers.{i}.linear2.{wb}", "copy"),
    ("encoder.text_layers.{i}.self_attn.attn.{rest}", _ENC + ".text_layers.{i}.self_attn.{rest}", "copy"),
    ("encoder.text_layers.{i}.norms.0.{wb}", _ENC + ".text_layers.{i}.norm1.{wb}", "copy"),
    ("encoder.text_layers.{i}.norms.1.{wb}", _ENC + ".text_layers.{i}.norm2.{wb}", "copy"),
    ("encoder.text_layers.{i}.ffn.layers.0.0.{wb}", _ENC + ".text_layers.{i}.linear1.{wb}", "copy"),
    ("encoder.text_layers.{i}.ffn.layers.1.{wb}", _ENC + ".text_layers.{i}.linear2.{wb}", "copy"),
    ("encoder.fusion_layers.{i}.{rest}", _ENC + ".fusion_layers.{i}.{rest}", "copy"),
    # Decoder: norms.0 after self-attn, .1 after text cross-attn, .2 after image cross-attn, .3 after FFN.
    ("decoder.layers.{i}.self_attn.attn.{rest}", _DEC + ".self_attn.{rest}", "copy"),
    ("decoder.layers.{i}.cross_attn_text.attn.{rest}", _DEC + ".ca_text.{rest}", "copy"),
    ("decoder.layers.{i}.cross_attn.{rest}", _DEC + ".cross_attn.{rest}", "copy"),
    ("decoder.layers.{i}.norms.0.{wb}", _DEC + ".norm2.{wb}", "copy"),
    ("decoder.layers.{i}.norms.1.{wb}", _DEC + ".catext_norm.{wb}", "copy"),
    ("decoder.layers.{i}.norms.2.{wb}", _DEC + ".norm1.{wb}", "copy"),
    ("decoder.layers.{i}.norms.3.{wb}", _DEC + ".norm3.{wb}", "copy"),
    ("decoder.layers.{i}.ffn.layers.0.0.{wb}", _DEC + ".linear1.{wb}", "copy"),
    ("decoder.layers.{i}.ffn.layers.1.{wb}", _DEC + ".linear2.{wb}", "copy"),
    ("decoder.norm.{wb}", "transformer.decoder.norm.{wb}", "copy"),
    ("decoder.ref_point_head.{rest}", "transformer.decoder.ref_point_head.{rest}", "copy"),
)

# (pattern, reason, required value or None). A key with a required value is dropped only when every element
# equals it (then it is an identity); otherwise the checkpoint is refused, since transformers cannot express it.
MMDET_DROPPED: tuple[tuple[str, str, float | None], ...] = (
    (
        "dn_query_generator.{rest}",
        "the label embedding of DINO's denoising queries, used only in training",
        None,
    ),
    (
        "data_preprocessor.{rest}",
        "image mean/std constants; the image processor written from --base normalises instead",
        None,
    ),
    (
        "bbox_head.cls_branches.{i}.log_scale",
        "the learnable logit scale exp(log_scale) of MMDetection's ContrastiveEmbed; 0 is an identity",
        0.0,
    ),
    (
        "bbox_head.cls_branches.{i}.bias",
        "the learnable logit bias of MMDetection's ContrastiveEmbed; 0 is an identity",
        0.0,
    ),
)
