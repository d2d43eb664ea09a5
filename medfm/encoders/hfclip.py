"""Hugging Face CLIP vision towers (``CLIPVisionModel``, ``CLIPModel``, a LLaVA folder's ``vision_tower``) as
medfm ViTs: the registered builder ``clip_vision`` and the converter of the transformers layout.

OpenAI's CLIP ViT differs from timm's in three places, all options of medfm's :class:`~medfm.encoders.vit.ViT`:
a LayerNorm before the first block (``pre_layrnorm`` -> ``norm_pre``), QuickGELU in the MLP (``hidden_act``),
and a patch embedding without bias (a zero bias here). Queries, keys and values are fused into timm's ``qkv``;
``post_layernorm`` is the final ``norm`` (applied to every token, so the class token read by ``forward`` is
CLIP's pooled output). The processor's mean / std and the grey-to-RGB repeat are the encoder's
:class:`~medfm.encoders.input_norm.InputNorm`, so medfm's [0, 1] images go in as they are. This is the tower
LLaVA uses (``vision_feature_layer=-2``: the patch tokens after the second-to-last block), which is what
``medfm.heads.multimodal`` reads it with.
"""

from __future__ import annotations

import torch

from medfm.data import Preprocess

from .formats import Checkpoint, Converted, Format, count_blocks, register_format, rename
from .openclip import OPENAI_NORM
from .registry import register_encoder
from .vit import ViT

ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


@register_encoder
def clip_vision(spatial_dims: int = 2, in_chans: int = 1, img_size=224, **kwargs) -> ViT:
    """OpenAI CLIP / LLaVA vision tower (pre-LayerNorm, QuickGELU): ViT-B/16 by default."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True, mlp="quick_gelu", norm_eps=1e-5,
                input_norm={"channels": 3, **OPENAI_NORM})
    args.update(kwargs)
    return ViT(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **args)


_RULES = [
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^pre_layrnorm\.", "norm_pre."),
    (r"^post_layernorm\.", "norm."),
    (r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
]
PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "vision_model.", "model.vision_tower.",
            "vision_tower.")  # transformers 5 saves the tower without `vision_model.`


def vision_config(config: dict) -> dict:
    """The vision part of a CLIP, CLIP-vision or LLaVA ``config.json``."""
    return config.get("vision_config", config)


def from_hf_clip(ckpt: Checkpoint) -> Converted:
    cfg = vision_config(ckpt.config)
    sd = dict(ckpt.state_dict)  # transformers 5 saves a CLIPVisionModel without its `vision_model.` prefix
    for prefix in PREFIXES:  # the vision tower alone, whatever model holds it
        part = {k.removeprefix(prefix): v for k, v in ckpt.state_dict.items() if k.startswith(prefix)}
        if part:
            sd = part
            break
    sd = rename(sd, _RULES)
    for stem in {k.rsplit(".attn.", 1)[0] for k in sd if ".attn.q." in k}:
        for kind in ("weight", "bias"):
            sd[f"{stem}.attn.qkv.{kind}"] = torch.cat([sd.pop(f"{stem}.attn.{p}.{kind}") for p in "qkv"], dim=0)
    sd["cls_token"] = sd["cls_token"].reshape(1, 1, -1)
    sd["pos_embed"] = sd["pos_embed"].unsqueeze(0)
    proj = sd["patch_embed.proj.weight"]
    sd.setdefault("patch_embed.proj.bias", torch.zeros(proj.shape[0], dtype=proj.dtype))
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r}: only {sorted(ACTIVATIONS)} CLIP towers are converted")
    size, patch = cfg.get("image_size", 224), proj.shape[-1]
    dim = proj.shape[0]
    args = dict(embed_dim=dim, depth=count_blocks(sd),
                num_heads=cfg.get("num_attention_heads", max(1, dim // 64)), patch_size=patch, pos_size=size,
                mlp=ACTIVATIONS[act], mlp_ratio=cfg.get("intermediate_size", 4 * dim) / dim, pre_norm=True,
                norm_eps=cfg.get("layer_norm_eps", 1e-5), fc_norm=False,
                input_norm={"channels": proj.shape[1], **OPENAI_NORM})
    proc = ckpt.configs.get("preprocessor_config.json", {})
    if proc.get("image_mean"):
        args["input_norm"].update(mean=proc["image_mean"], std=proc["image_std"])
    return Converted("clip_vision", args, sd, Preprocess("radiograph_2d", size).record(),
                     {"img_size": size, "patch_size": patch, "spatial_dims": 2})


def _is_hf_clip(ckpt: Checkpoint) -> bool:
    return ckpt.config.get("model_type") in ("clip", "clip_vision_model", "llava") and \
        vision_config(ckpt.config).get("model_type", "clip_vision_model") == "clip_vision_model"


register_format(Format(
    name="clip-hf", architecture="clip_vision",
    source="Hugging Face CLIPVisionModel / CLIPModel / LlavaForConditionalGeneration folder (its vision tower)",
    preprocess="RGB, the folder's preprocessor_config.json mean/std (OpenAI CLIP's by default), image_size px",
    license="OpenAI CLIP: MIT; others: see the model card",
    example="medfm finetune tasks/mllm_2d.yaml --encoder hf:openai/clip-vit-base-patch16 --data ...",
    keys=(r"embeddings\.patch_embedding\.weight$", r"pre_layrnorm\.weight$"),
    convert=from_hf_clip, accepts=_is_hf_clip,
))
