"""MONAI's 3D foundation encoders as medfm encoders: the SwinUNETR self-supervised Swin transformer and CT-FM's
SegResEncoder. Both are pyramids of feature maps, the form medfm's U-Net decoder and classification heads take.

* **SwinUNETR-SSL** (Tang et al., CVPR 2022; ``model_swinvit.pt`` from Project-MONAI/research-contributions):
  the keys are the Swin ViT's own under ``module.`` (``swinViT.`` / ``swin_vit.`` in re-saved copies), with the
  pretraining code's ``mlp.fc1`` / ``fc2`` for MONAI's ``mlp.linear1`` / ``linear2``; the SSL heads
  (rotation, contrastive, reconstruction) are dropped. Maps at strides 2..32 (MONAI's ``swinViT(x,
  normalize=True)``), 16x ``feature_size`` channels at the bottom. CT inputs as in its pretraining: HU
  [-1000, 1000] -> [0, 1], 1.5 mm, 96^3 crops.
* **CT-FM** (Pai et al. 2025; ``project-lighter/ct_fm_feature_extractor``: a MONAI ``SegResEncoder`` saved as
  safetensors with a config): maps at strides 2..16 (the stride-1 map of the first level is left to the
  decoder's own stem). CT inputs: HU [-1024, 2048] -> [0, 1], as its model card states.
* **MONAI ViT** (M3D-CLIP's vision encoder, and any MONAI ``ViT``): converted into medfm's own ViT (a
  perceptron patch embedding is a convolution), so LoRA, VPT and the UNETR decoder apply unchanged.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.nets.segresnet_ds import SegResEncoder
from monai.networks.nets.swin_unetr import SwinTransformer
from timm.models._features import feature_take_indices

from medfm.data import Preprocess

from .formats import Checkpoint, Converted, Format, count_blocks, register_format, rename, strip_prefix
from .interface import EncoderBase
from .registry import register_encoder
from .vit import ViT, mlp_args


class _Pyramid(EncoderBase):
    """A MONAI network whose ``maps(x)`` gives feature maps at strides 2, 4, ..., ``patch_size``."""

    feature_maps = "pyramid"

    def _check(self, x: torch.Tensor) -> None:
        stride = self.patch_size[0]
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans or any(s % stride for s in x.shape[2:]):
            raise ValueError(f"{type(self).__name__}(spatial_dims={self.spatial_dims}) expects (B, {self.in_chans}, "
                             f"*{self.spatial_dims} sizes divisible by {stride}), got shape {tuple(x.shape)}")

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[torch.Tensor]:
        self._check(x)
        maps = self.maps(x)
        take, _ = feature_take_indices(len(maps), indices)
        return [maps[i] for i in take]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x, indices=[-1])[0]


class SwinEncoder(_Pyramid):
    """MONAI's Swin transformer (SwinUNETR's encoder), 2D or 3D."""

    lora_targets = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear1|linear2))"
    input_conv = "net.patch_embed.proj.weight"

    def __init__(self, spatial_dims: int = 3, in_chans: int = 1, img_size: int | Sequence[int] = 96,
                 feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7):
        super().__init__()
        self.spatial_dims, self.in_chans, self.img_size = spatial_dims, in_chans, img_size
        # kept for a network built around this encoder (MONAI's SwinUNETR: medfm.heads.BackboneNetwork)
        self.feature_size, self.depths, self.num_heads, self.window_size = feature_size, tuple(depths), tuple(num_heads), window_size
        self.net = SwinTransformer(in_chans=in_chans, embed_dim=feature_size, window_size=(window_size,) * spatial_dims,
                                   patch_size=(2,) * spatial_dims, depths=depths, num_heads=num_heads,
                                   spatial_dims=spatial_dims, downsample="merging")
        self.embed_dim = self.num_features = feature_size * 16
        self.patch_size = (32,) * spatial_dims

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x, normalize=True)

    def encoder_blocks(self) -> list[nn.Module]:
        return [self.net.layers1, self.net.layers2, self.net.layers3, self.net.layers4]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for layer in self.encoder_blocks():
            layer[0].use_checkpoint = enable


@register_encoder
def swin_vit(spatial_dims: int = 3, in_chans: int = 1, img_size=96, **kwargs) -> SwinEncoder:
    """SwinUNETR's Swin transformer (MONAI; self-supervised weights: model_swinvit.pt), 3D or 2D."""
    return SwinEncoder(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **kwargs)


class SegResEncoderFamily(_Pyramid):
    """MONAI's ``SegResEncoder`` (SegResNet's encoder; CT-FM), 2D or 3D."""

    lora_targets = r".*blocks\.\d+\.conv[12]"  # peft's convolution LoRA on every residual block
    input_conv = "net.conv_init.weight"

    def __init__(self, spatial_dims: int = 3, in_chans: int = 1, img_size: int | Sequence[int] = 96,
                 init_filters: int = 32, blocks_down: Sequence[int] = (1, 2, 2, 4, 4), norm: str = "batch",
                 act: str = "relu"):
        super().__init__()
        self.spatial_dims, self.in_chans, self.img_size = spatial_dims, in_chans, img_size
        # kept for a network built around this encoder (MONAI's SegResNetDS: medfm.heads.BackboneNetwork)
        self.init_filters, self.blocks_down, self.norm_name, self.act_name = init_filters, tuple(blocks_down), norm, act
        self.net = SegResEncoder(spatial_dims=spatial_dims, init_filters=init_filters, in_channels=in_chans,
                                 blocks_down=tuple(blocks_down), norm=norm, act=act)
        levels = len(blocks_down)
        self.embed_dim = self.num_features = init_filters * 2 ** (levels - 1)
        self.patch_size = (2 ** (levels - 1),) * spatial_dims

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)[1:]  # strides 2 .. 2^(levels-1); the stride-1 map is the decoder stem's job

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.net.layers)


@register_encoder
def segres_encoder(spatial_dims: int = 3, in_chans: int = 1, img_size=96, **kwargs) -> SegResEncoderFamily:
    """SegResNet's encoder (MONAI SegResEncoder; CT-FM's feature extractor), 3D or 2D."""
    return SegResEncoderFamily(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **kwargs)


# ----------------------------------------------------------------------------------------- converters
def from_swin_ssl(ckpt: Checkpoint) -> Converted:
    sd = strip_prefix(ckpt.state_dict, "module.", "swinViT.", "swin_vit.")
    sd = strip_prefix(sd, "swinViT.", "swin_vit.")  # module.swinViT.*: both prefixes
    sd = rename(sd, [(r"\.mlp\.fc(\d)\.", r".mlp.linear\1.")], drop=(r"^(?!patch_embed\.|layers\d)",))  # SSL heads go
    proj = sd["patch_embed.proj.weight"]
    depths = [sum(1 for k in sd if re.match(rf"layers{i}\.0\.blocks\.\d+\.norm1\.weight$", k)) for i in range(1, 5)]
    heads = [sd[f"layers{i}.0.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(1, 5)]
    dims = proj.ndim - 2
    rows = sd["layers1.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (round(rows ** (1 / dims)) + 1) // 2
    args = dict(feature_size=proj.shape[0], depths=depths, num_heads=heads, window_size=window)
    sd = {f"net.{k}": v for k, v in sd.items()}
    return Converted("swin_vit", args, sd, Preprocess("ct_3d", 96, {"spacing": 1.5, "window": [-1000, 1000]}).record(),
                     {"spatial_dims": dims})


def from_ct_fm(ckpt: Checkpoint) -> Converted:
    sd = strip_prefix(ckpt.state_dict, "module.", "encoder.", "model.")
    cfg = ckpt.config
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    blocks = [sum(1 for k in sd if re.match(rf"layers\.{i}\.blocks\.\d+\.conv1\.weight$", k)) for i in range(levels)]
    norm = "instance" if not any(k.endswith("running_mean") for k in sd) else "batch"
    args = dict(init_filters=sd["conv_init.weight"].shape[0], blocks_down=cfg.get("blocks_down", blocks), norm=norm)
    if isinstance(cfg.get("act"), str):
        args["act"] = cfg["act"]
    sd = {f"net.{k}": v for k, v in sd.items()}
    dims = sd["net.conv_init.weight"].ndim - 2
    return Converted("segres_encoder", args, sd,
                     Preprocess("ct_3d", 96, {"spacing": 1.0, "window": [-1024, 2048]}).record(), {"spatial_dims": dims})


register_format(Format(
    name="swinunetr-ssl", architecture="swin_vit",
    source="SwinUNETR self-supervised Swin ViT (model_swinvit.pt: module.* / swinViT.* keys, mlp.fc1 / fc2)",
    preprocess="CT: HU [-1000, 1000] -> [0, 1], 1.5 mm, 96^3 (its pretraining's)",
    license="Apache-2.0",
    example="medfm finetune tasks/segment_3d.yaml --encoder model_swinvit.pt --data data/msd_hippocampus/manifest.csv ...",
    keys=(r"(^|\.)layers1\.0\.blocks\.0\.attn\.relative_position_bias_table$", r"(^|\.)patch_embed\.proj\.weight$",
          r"(^|\.)layers4\.0\.blocks\.0\.attn\.qkv\.weight$"),
    convert=from_swin_ssl,
))
register_format(Format(
    name="ct-fm", architecture="segres_encoder",
    source="CT-FM feature extractor (project-lighter/ct_fm_feature_extractor: a MONAI SegResEncoder, safetensors)",
    preprocess="CT: HU [-1024, 2048] -> [0, 1] (model card); spacing and crop as your task needs",
    license="CT-FM: the model card's (check before use)",
    example="medfm finetune tasks/classify_3d.yaml --encoder hf:project-lighter/ct_fm_feature_extractor --data ...",
    keys=(r"(^|\.)conv_init\.weight$", r"(^|\.)layers\.0\.blocks\.0\.conv1\.weight$"),
    convert=from_ct_fm,
))


# ------------------------------------------------------------------------------ MONAI ViT (M3D-CLIP's vision)
M3D_GRID = {"img_size": [32, 256, 256], "patch_size": [4, 16, 16]}  # M3D-CLIP's vision encoder


@register_encoder
def monai_vit(spatial_dims: int = 3, in_chans: int = 1, img_size=(32, 256, 256), **kwargs) -> ViT:
    """MONAI ``ViT`` weights (M3D-CLIP's vision encoder: perceptron patches, no class position) in medfm's ViT."""
    args = dict(patch_size=(4, 16, 16), embed_dim=768, depth=12, num_heads=12, qkv_bias=False, norm_eps=1e-5,
                no_embed_class=True)
    args.update(kwargs)
    return ViT(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **args)


def from_monai_vit(ckpt: Checkpoint) -> Converted:
    """MONAI ``ViT`` keys -> medfm's: a perceptron patch embedding (``Rearrange`` + ``Linear`` over
    ``(p1 p2 p3 c)``) becomes the equivalent convolution; ``out_proj`` / ``linear1`` / ``linear2`` are timm's
    ``proj`` / ``fc1`` / ``fc2``; the class token, when there is one, carries no position (``no_embed_class``)."""
    sd = strip_prefix(ckpt.state_dict, "module.", "vision_encoder.", "encoder.")
    sd = {k: v for k, v in sd.items() if not k.startswith(("classification_head.",)) and "norm_cross_attn" not in k}
    cfg = {**M3D_GRID, **{k: ckpt.config[k] for k in ("img_size", "patch_size") if k in ckpt.config}}
    pos = sd.pop("patch_embedding.position_embeddings")
    dim, n = pos.shape[-1], pos.shape[1]
    if "patch_embedding.patch_embeddings.1.weight" in sd:  # perceptron
        w = sd.pop("patch_embedding.patch_embeddings.1.weight")
        patch = list(cfg["patch_size"])
        chans = w.shape[1] // math.prod(patch)
        sd["patch_embed.proj.weight"] = w.reshape(dim, *patch, chans).movedim(-1, 1).contiguous()
        sd["patch_embed.proj.bias"] = sd.pop("patch_embedding.patch_embeddings.1.bias")
    else:  # convolution
        sd["patch_embed.proj.weight"] = sd.pop("patch_embedding.patch_embeddings.weight")
        sd["patch_embed.proj.bias"] = sd.pop("patch_embedding.patch_embeddings.bias")
        patch = list(sd["patch_embed.proj.weight"].shape[2:])
    grid = [s // p for s, p in zip(cfg["img_size"], patch)]
    if math.prod(grid) != n:  # no config: an isotropic grid
        side = round(n ** (1 / len(patch)))
        grid, cfg["img_size"] = [side] * len(patch), [side * p for p in patch]
    sd["pos_embed"] = pos
    sd = rename(sd, [(r"\.attn\.out_proj\.", ".attn.proj."), (r"\.mlp\.linear(\d)\.", r".mlp.fc\1.")])
    cls = "cls_token" in sd
    heads = ckpt.config.get("num_heads", max(1, dim // 64))
    args = dict(embed_dim=dim, depth=count_blocks(sd), num_heads=heads, patch_size=patch, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                **mlp_args(sd), class_token=cls,
                global_pool="token" if cls else "avg", fc_norm=False)
    dims = len(patch)
    preprocess = (Preprocess("ct_3d", cfg["img_size"], {"spacing": 1.5}) if dims == 3
                  else Preprocess("radiograph_2d", cfg["img_size"])).record()
    return Converted("monai_vit", args, sd, preprocess,
                     {"img_size": cfg["img_size"], "patch_size": patch, "spatial_dims": dims, "no_embed_class": True})


register_format(Format(
    name="monai-vit", architecture="monai_vit",
    source="MONAI ViT state dict (M3D-CLIP's vision_encoder.*: perceptron or conv patch embedding)",
    preprocess="CT min-max to [0, 1] (M3D); 32 x 256 x 256 with 4 x 16 x 16 patches unless its config.json says",
    license="M3D: Apache-2.0",
    example="medfm finetune tasks/classify_3d.yaml --encoder m3d_clip_vision.safetensors --method lora --data ...",
    keys=(r"(^|\.)patch_embedding\.position_embeddings$", r"(^|\.)blocks\.0\.attn\.out_proj\.weight$"),
    convert=from_monai_vit,
))
