"""A trained :class:`~medfm.heads.multimodal.MultimodalLM` as a transformers ``LlavaForConditionalGeneration``
folder, so a model trained here is served by the tools that serve LLaVA.

The vision tower is written in the layout of the encoder's own family: a CLIP tower (``pre_norm``, the
``clip_vision`` family and every ViT with a pre-LayerNorm) as ``CLIPVisionModel``; a timm-style ViT without
one (medfm's MAE / DINO / CLIP-pretrained ViTs) as ``Dinov2Model`` with LayerScale 1 (the same network:
LayerNorm, attention, LayerNorm, GELU MLP; Dinov2 adds nothing else). The projector keeps its names
(``linear_1``, ``linear_2``); LoRA is merged into the LM's weights first. The encoder's fixed input
normalisation becomes the image processor's mean / std, so LLaVA's processor feeds the tower what medfm's
[0, 1] images feed it. Only 2D ViTs with a class token and no registers are exported (what LLaVA's
``default`` feature strategy reads: the patch tokens after the class token).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch


def _vision_tower(encoder) -> tuple[object, dict]:
    """A transformers vision config and its state dict (keys inside the tower) holding ``encoder``'s weights."""
    from transformers import CLIPVisionConfig, Dinov2Config

    enc = encoder
    if getattr(enc, "spatial_dims", 2) != 2 or getattr(enc, "cls_token", None) is None or getattr(enc, "reg_token", None) is not None:
        raise ValueError("only a 2D ViT with a class token and no registers exports to LLaVA "
                         f"(this encoder: {type(enc).__name__}, spatial_dims={getattr(enc, 'spatial_dims', '?')})")
    sd = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    dim, depth = enc.embed_dim, len(enc.blocks)
    heads = enc.blocks[0].attn.num_heads
    inner = enc.blocks[0].mlp.fc1.out_features
    norm = enc.input_norm
    channels = getattr(norm, "channels", enc.in_chans)
    size, patch = enc.pos_grid[0] * enc.patch_size[0], enc.patch_size[0]
    act = "quick_gelu" if type(enc.blocks[0].mlp.act).__name__ == "QuickGELU" else "gelu"
    eps = enc.blocks[0].norm1.eps
    out = {}
    if not isinstance(enc.norm_pre, torch.nn.Identity):  # CLIP
        if enc.patch_embed.proj.bias is not None and sd["patch_embed.proj.bias"].abs().max() > 0:
            raise ValueError("a CLIP vision tower has no patch-embedding bias; this encoder's is not zero")
        config = CLIPVisionConfig(hidden_size=dim, intermediate_size=inner, num_hidden_layers=depth, num_attention_heads=heads,
                                  num_channels=channels, image_size=size, patch_size=patch, hidden_act=act, layer_norm_eps=eps)
        out["embeddings.patch_embedding.weight"] = sd["patch_embed.proj.weight"]
        out["embeddings.class_embedding"] = sd["cls_token"].reshape(-1)
        out["embeddings.position_embedding.weight"] = sd["pos_embed"][0]
        out["pre_layrnorm.weight"], out["pre_layrnorm.bias"] = sd["norm_pre.weight"], sd["norm_pre.bias"]
        post = "post_layernorm"
        layer = "encoder.layers.{i}."
        names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj", "mlp.fc1": "mlp.fc1",
                 "mlp.fc2": "mlp.fc2", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}
    else:  # a timm-style ViT: Dinov2's layout with LayerScale 1
        if act != "gelu" or inner % dim:
            raise ValueError(f"a ViT without a pre-LayerNorm exports with a GELU MLP of a whole-number ratio "
                             f"(this one: {act}, {inner} / {dim})")
        config = Dinov2Config(hidden_size=dim, mlp_ratio=inner // dim, num_hidden_layers=depth, num_attention_heads=heads,
                              num_channels=channels, image_size=size, patch_size=patch, hidden_act="gelu", layer_norm_eps=eps,
                              layerscale_value=1.0, qkv_bias="blocks.0.attn.qkv.bias" in sd)
        out["embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.proj.weight"]
        out["embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.proj.bias"]
        out["embeddings.cls_token"] = sd["cls_token"]
        out["embeddings.mask_token"] = torch.zeros(1, dim)
        out["embeddings.position_embeddings"] = sd["pos_embed"]
        post = "layernorm"
        layer = "encoder.layer.{i}."
        names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
                 "mlp.fc2": "mlp.fc2", "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj"}
        for i in range(depth):
            for s in ("1", "2"):
                out[layer.format(i=i) + f"layer_scale{s}.lambda1"] = sd.get(f"blocks.{i}.ls{s}.gamma", torch.ones(dim))
    final = "norm" if "norm.weight" in sd else "fc_norm"
    out[f"{post}.weight"], out[f"{post}.bias"] = sd[f"{final}.weight"], sd[f"{final}.bias"]
    for i in range(depth):
        src, dst = f"blocks.{i}.", layer.format(i=i)
        for a in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                out[dst + names[a] + f".{kind}"] = sd[f"{src}{a}.{kind}"]
        for kind in ("weight", "bias"):
            if f"{src}attn.qkv.{kind}" in sd:
                for part, t in zip("qkv", sd[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)):
                    out[dst + names[part] + f".{kind}"] = t
    mean = norm.mean.tolist() if hasattr(norm, "mean") else [0.0] * channels
    std = norm.std.tolist() if hasattr(norm, "std") else [1.0] * channels
    return config, out, {"image_mean": mean, "image_std": std, "size": size}


def to_llava(model, out: str | os.PathLike):
    """Write ``model`` as a ``LlavaForConditionalGeneration`` folder (+ tokenizer and image processor); returns
    the transformers model it wrote."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    vision_config, vision_sd, proc = _vision_tower(model.encoder)
    lm = copy.deepcopy(model.lm)
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()
    if model.projector.pool or model.projector.resampler is not None or model.projector.depth != 2:
        raise ValueError("only the mlp2x_gelu projector without pooling or resampler is LLaVA's")
    feature_layer = model.feature_layer
    config = LlavaConfig(vision_config=vision_config, text_config=lm.config, image_token_id=model.image_token_id,
                         projector_hidden_act="gelu", vision_feature_layer=feature_layer,
                         vision_feature_select_strategy="default", image_seq_length=model.tokens_per_image(
                             [proc["size"]] * 2))
    llava = LlavaForConditionalGeneration(config).eval()
    state = {f"model.vision_tower.{k}": v for k, v in vision_sd.items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in model.projector.state_dict().items()})
    for k, v in lm.state_dict().items():
        if k.startswith("model."):
            state["model.language_model." + k[len("model."):]] = v
        else:
            state[k] = v
    missing, unexpected = llava.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and lm.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"LLaVA export: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if lm.config.tie_word_embeddings:
        llava.tie_weights()
    out = Path(out)
    llava.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": proc["size"]}, crop_size=proc["size"], do_center_crop=True,
                       do_convert_rgb=vision_config.num_channels == 3, image_mean=proc["image_mean"],
                       image_std=proc["image_std"]).save_pretrained(out)
    (out / "medfm_export.json").write_text(json.dumps({"tokens_per_image": config.image_seq_length,
                                                       "image_token": model.tokenizer.convert_ids_to_tokens(model.image_token_id)}))
    return llava
