"""DINOv2 and RAD-DINO as medfm ViTs: one registered builder (``dinov2``) and the converters of three layouts.

* Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` folders (``config.json`` + weights; RAD-DINO
  ``microsoft/rad-dino`` is one), with both the transformers < 5 key names (``attention.attention.query``,
  ``mlp.weights_in``) and today's (``attention.q_proj``, ``mlp.gate_proj``);
* timm ``vit_*_patch14_dinov2`` / ``vit_*_patch14_reg4_dinov2`` state dicts (already medfm's keys);
* the original ``facebookresearch/dinov2`` checkpoints (``dinov2_vitb14_pretrain.pth``: ``mask_token``,
  ``register_tokens``, ``mlp.w12`` / ``w3``, chunked ``blocks.0.N``).

The network is medfm's :class:`~medfm.encoders.vit.ViT` with LayerScale, register tokens and SwiGLU, so a
DINOv2 encoder is also a 3D encoder (inflated like any timm ViT) and takes every medfm recipe. Registers are
stored as timm stores them (``no_embed_class``: the class token absorbs its position embedding). The
upstream input normalisation (ImageNet statistics, or RAD-DINO's from its ``preprocessor_config.json``) and
the grey-to-RGB repeat are the encoder's fixed :class:`~medfm.encoders.input_norm.InputNorm`.
"""

from __future__ import annotations

import math
import re

import torch

from medfm.data import Preprocess

from .formats import Checkpoint, Converted, Format, count_blocks, register_format, rename, strip_prefix
from .registry import register_encoder
from .vit import ViT, mlp_args

IMAGENET = {"channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
HEAD_DIM = 64  # every published DINOv2 size (S 6, B 12, L 16, g 24 heads): the heads are not in the weights


@register_encoder
def dinov2(spatial_dims: int = 2, in_chans: int = 1, img_size=518, **kwargs) -> ViT:
    """DINOv2 / RAD-DINO ViT (patch 14, LayerScale, registers, SwiGLU): HF, timm or original checkpoints."""
    args = dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, input_norm=IMAGENET)
    args.update(kwargs)
    return ViT(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **args)


def _finish(sd: dict[str, torch.Tensor], args: dict, image_size: int | None, norm: dict,
            size: int | None = None) -> Converted:
    """Common end of every layout: registers to timm's ``no_embed_class`` form, the token grid, the record."""
    sd.pop("mask_token", None)
    patch = sd["patch_embed.proj.weight"].shape[-1]
    regs = sd.pop("register_tokens", None)
    if regs is not None:
        sd["reg_token"] = regs
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
        args.update(reg_tokens=regs.shape[1], no_embed_class=True, pos_antialias=True)  # as DINOv2-reg resamples
    n = sd["pos_embed"].shape[1] - (0 if args.get("no_embed_class") else 1 + args.get("reg_tokens", 0))
    side = math.isqrt(n)
    if image_size is None or (image_size // patch) ** 2 != n:
        image_size = side * patch
    args.update(patch_size=patch, init_values=1e-5 if "blocks.0.ls1.gamma" in sd else None,
                input_norm={**norm, "channels": sd["patch_embed.proj.weight"].shape[1]},
                **mlp_args(sd))
    args["pos_size"] = image_size  # the native grid, kept (resampled to each input at run time)
    source = {"img_size": image_size, "patch_size": patch, "spatial_dims": 2, **{k: args[k] for k in ("reg_tokens", "no_embed_class") if k in args}}
    preprocess = Preprocess("radiograph_2d", size or 224).record()
    return Converted("dinov2", args, sd, preprocess, source)


# ------------------------------------------------------------------------------------- Hugging Face
_HF_RULES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.(?:attention\.)?(query|q_proj)\.", r".attn.q."),
    (r"\.attention\.(?:attention\.)?(key|k_proj)\.", r".attn.k."),
    (r"\.attention\.(?:attention\.)?(value|v_proj)\.", r".attn.v."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"\.mlp\.(weights_in|w12)\.", ".mlp.fc1."),
    (r"\.mlp\.(weights_out|w3|down_proj)\.", ".mlp.fc2."),
    (r"^layernorm\.", "norm."),
]


def _fuse(sd: dict[str, torch.Tensor], parts: tuple[str, ...], fused: str) -> None:
    """Concatenate ``blocks.N.<part>.{weight,bias}`` along the output dim into ``blocks.N.<fused>``."""
    for key in [k for k in sd if re.search(rf"\.{re.escape(parts[0])}\.(weight|bias)$", k)]:
        stem, kind = key.rsplit(f"{parts[0]}.", 1)
        sd[f"{stem}{fused}.{kind}"] = torch.cat([sd.pop(f"{stem}{p}.{kind}") for p in parts], dim=0)


def from_hf(ckpt: Checkpoint) -> Converted:
    cfg = ckpt.config
    sd = rename(strip_prefix(ckpt.state_dict, "dinov2.", "model."), _HF_RULES)
    _fuse(sd, ("attn.q", "attn.k", "attn.v"), "attn.qkv")
    _fuse(sd, ("mlp.gate_proj", "mlp.up_proj"), "mlp.fc1")  # transformers >= 5 splits SwiGLU's fc1
    args = dict(embed_dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                norm_eps=cfg.get("layer_norm_eps", 1e-6), qkv_bias=cfg.get("qkv_bias", True))
    proc = ckpt.configs.get("preprocessor_config.json", {})
    norm = {"mean": proc.get("image_mean", IMAGENET["mean"]), "std": proc.get("image_std", IMAGENET["std"])}
    crop = proc.get("crop_size", {})
    size = crop.get("height") if isinstance(crop, dict) else crop
    return _finish(sd, args, cfg.get("image_size"), norm, size)


# --------------------------------------------------------------------------------- timm and original
def from_state_dict(ckpt: Checkpoint) -> Converted:
    """timm ``*_dinov2`` and original DINOv2 layouts: the architecture read off the weights' shapes."""
    sd = strip_prefix(ckpt.state_dict, "module.", "backbone.")
    sd = rename(sd, [(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # original giant: blocks chunked as blocks.0.N
                     (r"\.mlp\.w12\.", ".mlp.fc1."), (r"\.mlp\.w3\.", ".mlp.fc2.")])
    dim = sd["cls_token"].shape[-1]
    if "pos_embed" in sd and "reg_token" in sd:  # timm reg4: no position slot for the class token
        args = {"reg_tokens": sd["reg_token"].shape[1], "no_embed_class": True, "pos_antialias": True}
    else:
        args = {}
    args.update(embed_dim=dim, depth=count_blocks(sd), num_heads=max(1, dim // HEAD_DIM))
    return _finish(sd, args, None, {k: IMAGENET[k] for k in ("mean", "std")})


def _is_hf_dinov2(ckpt: Checkpoint) -> bool:
    return ckpt.config.get("model_type") in ("dinov2", "dinov2_with_registers")


register_format(Format(
    name="dinov2-hf", architecture="dinov2",
    source="Hugging Face Dinov2Model / Dinov2WithRegistersModel folder (config.json + weights)",
    preprocess="RGB, the folder's preprocessor_config.json mean/std (ImageNet's by default), crop size (224)",
    license="DINOv2: Apache-2.0; RAD-DINO: MSRLA (research use)",
    example="medfm finetune tasks/classify_2d.yaml --encoder hf:microsoft/rad-dino --method lora --data ...",
    keys=(r"embeddings\.patch_embeddings\.projection\.weight$", r"encoder\.layer\.0\.layer_scale1\.lambda1$"),
    convert=from_hf, accepts=_is_hf_dinov2,
))
register_format(Format(
    name="dinov2-original", architecture="dinov2",
    source="facebookresearch/dinov2 checkpoint (dinov2_vit*14[_reg4]_pretrain.pth)",
    preprocess="RGB, ImageNet mean/std, 224 px (patch 14)",
    license="Apache-2.0",
    example="medfm finetune tasks/classify_2d.yaml --encoder dinov2_vitb14_pretrain.pth --method lora --data ...",
    keys=(r"^(module\.|backbone\.)?mask_token$", r"^(module\.|backbone\.)?blocks\.\d+\.(\d+\.)?ls1\.gamma$"),
    convert=from_state_dict,
    precedes=("dinov2-timm",),  # the original layout carries every key a timm one has, and its mask_token
))
register_format(Format(
    name="dinov2-timm", architecture="dinov2",
    source="timm vit_*_patch14_dinov2 / *_reg4_dinov2 state dict",
    preprocess="RGB, ImageNet mean/std, 224 px (patch 14)",
    license="Apache-2.0",
    example="medfm finetune tasks/classify_2d.yaml --encoder vit_base_patch14_dinov2.safetensors --method lora ...",
    keys=(r"^blocks\.0\.ls1\.gamma$", r"^cls_token$", r"^patch_embed\.proj\.weight$"),
    convert=from_state_dict,
    accepts=lambda ckpt: ckpt.state_dict["patch_embed.proj.weight"].shape[-1] == 14,
))
