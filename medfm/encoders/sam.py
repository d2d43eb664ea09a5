"""SAM / MedSAM image encoders as medfm encoders (2D), on timm's ``VisionTransformerSAM``.

A SAM ViT (Kirillov et al. 2023) windows its attention (14 x 14 windows) except in a few global blocks, adds
decomposed relative positions inside attention, and ends in a 256-channel convolutional neck that feeds SAM's
mask decoder. MedSAM (Ma et al. 2024) is the same ViT-B fine-tuned on medical images. The ``image_encoder.*``
part of a SAM / MedSAM ``.pth`` (or a timm ``samvit_*`` state dict) converts here with timm's own key
mapping; the prompt encoder and mask decoder are not used: medfm's segmentation decoders take the neck's maps.

The network is built at the checkpoint's native size (``sam_img_size``, 1024 px: the relative-position
tables are sized for it) and runs at any input divisible by 16: timm resamples the absolute position grid
and interpolates the relative tables, as SAM's own code does for other sizes. SAM normalises 0..255 RGB by
ImageNet statistics; that is the encoder's :class:`InputNorm`. MedSAM expects CT windowed first (abdomen
W400 / L40 in its examples): medfm's 2D preset scales by percentiles, so window CT slices when exporting them
(HU -160..240 to 0..255) before training on them.

SAM-Med2D (Cheng et al. 2023) is a ViT-B at 256 px with an adapter beside each block's MLP
(``image_encoder.blocks.N.Adapter.*``: :class:`SAMMed2DAdapter`); such a checkpoint converts with ``adapters``
set, read from its keys.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer_sam import checkpoint_filter_fn as timm_sam_filter

from medfm.data import Preprocess

from .dinov2 import IMAGENET
from .formats import Checkpoint, Converted, Format, count_blocks, register_format
from .input_norm import input_layer
from .interface import EncoderBase
from .registry import register_encoder


class SAMMed2DAdapter(nn.Module):
    """SAM-Med2D's adapter, added beside a block's MLP on the same normed input: the map gated per channel by a
    squeeze-excite MLP, through a stride-2 convolution and its transposed convolution, added to the input and
    layer-normed. Input and output (B, H, W, C), as a SAM block's tokens are laid out."""

    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = nn.LayerNorm(dim)
        self.channel = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, dim, bias=False), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(dim, dim, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                                     nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        gated = x * self.channel(x.mean((2, 3)))[..., None, None]
        return self.norm((x + self.spatial(gated)).permute(0, 2, 3, 1))


def _remember_grid(block: nn.Module, args: tuple) -> None:
    block.grid = args[0].shape[1:3]  # (H, W) of the block's input; its MLP sees the tokens flattened


def _add_adapter(block: nn.Module, mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The MLP's output plus the block's adapter on the MLP's own (normed) input: SAM-Med2D's
    ``x + mlp(norm2(x)) + Adapter(norm2(x))``."""
    normed = args[0].reshape(out.shape[0], *block.grid, -1)
    return out + block.Adapter(normed).reshape(out.shape)


def add_adapters(net: nn.Module) -> None:
    """A :class:`SAMMed2DAdapter` in each block of timm's SAM ViT ``net`` (keys ``blocks.N.Adapter.*``, as
    SAM-Med2D saves them), added to the MLP branch by forward hooks so every other weight keeps its name."""
    for block in net.blocks:
        block.Adapter = SAMMed2DAdapter(block.norm2.normalized_shape[0])
        block.register_forward_pre_hook(_remember_grid)
        block.mlp.register_forward_hook(partial(_add_adapter, block))


class SAMEncoder(EncoderBase):
    """SAM image encoder: maps (B, neck_chans, H/16, W/16); pooled embedding: their spatial mean."""

    dims = (2,)
    feature_maps = "tokens"  # every block gives a map at the patch stride (through the neck): UNETR decoder
    lora_targets = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
    input_conv = "net.patch_embed.proj.weight"

    def __init__(self, spatial_dims: int = 2, in_chans: int = 1, img_size: int | Sequence[int] = 1024,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11), neck_chans: int = 256, sam_img_size: int = 1024,
                 patch_size: int = 16, input_norm: dict | None = IMAGENET, adapters: bool = False):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError("SAM's image encoder is 2D (windowed attention over an image grid): spatial_dims=2")
        self.spatial_dims, self.in_chans, self.img_size = 2, in_chans, img_size
        self.input_norm, net_chans = input_layer(in_chans, input_norm)
        self.net = timm.create_model(
            "samvit_base_patch16", img_size=sam_img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, window_size=window_size, global_attn_indexes=list(global_attn_indexes),
            neck_chans=neck_chans, in_chans=net_chans, num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))
        if adapters:  # SAM-Med2D
            add_adapters(self.net)
        self.embed_dim = self.num_features = neck_chans
        self.patch_size = (patch_size, patch_size)

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.net.blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.net.set_grad_checkpointing(enable)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans or any(s % self.patch_size[0] for s in x.shape[2:]):
            raise ValueError(f"SAMEncoder expects (B, {self.in_chans}, H, W) with H and W divisible by "
                             f"{self.patch_size[0]}, got shape {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The neck's output (B, neck_chans, H/16, W/16): what SAM's mask decoder reads."""
        self._check(x)
        return self.net.forward_features(self.input_norm(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[torch.Tensor]:
        """Maps after the chosen blocks, each through the neck (SAM's output projection, as a ViT's final norm
        is applied to its intermediates), so every map is ``neck_chans`` wide."""
        self._check(x)
        maps = self.net.forward_intermediates(self.input_norm(x), indices=indices, intermediates_only=True)
        return [self.net.neck(m) for m in maps]


@register_encoder
def sam_vit(spatial_dims: int = 2, in_chans: int = 1, img_size=1024, **kwargs) -> SAMEncoder:
    """SAM / MedSAM image encoder (windowed ViT, relative positions, 256-channel neck), 2D; ViT-B by default."""
    return SAMEncoder(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **kwargs)


_SAM_HEADS = {768: 12, 1024: 16, 1280: 16}  # ViT-B, -L, -H: without relative positions the heads are not in the weights


def from_sam(ckpt: Checkpoint) -> Converted:
    sd = ckpt.state_dict
    if "image_encoder.patch_embed.proj.weight" not in sd:  # MedSAM's training checkpoint nests the model
        sd = {k.removeprefix("module.").removeprefix("sam."): v for k, v in sd.items()}
    sd = timm_sam_filter({k: v for k, v in sd.items() if k.startswith("image_encoder.")} or sd, None)
    dim = sd["patch_embed.proj.weight"].shape[0]
    depth = count_blocks(sd)
    # relative-position table lengths: 2 * grid - 1 in the global blocks, 2 * window - 1 in the windowed ones
    rows = {i: sd[f"blocks.{i}.attn.rel_pos_h"] for i in range(depth) if f"blocks.{i}.attn.rel_pos_h" in sd}
    first = next(iter(rows.values()), None)
    heads = dim // first.shape[1] if first is not None else _SAM_HEADS.get(dim, max(1, dim // 64))
    grid = sd["pos_embed"].shape[1]
    windowed = [t.shape[0] for t in rows.values() if t.shape[0] != 2 * grid - 1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    args = dict(embed_dim=dim, depth=depth, num_heads=heads, neck_chans=sd["neck.0.weight"].shape[0],
                window_size=(windowed[0] + 1) // 2 if windowed else 14, sam_img_size=grid * patch, patch_size=patch,
                global_attn_indexes=[i for i, t in rows.items() if t.shape[0] == 2 * grid - 1],
                adapters="blocks.0.Adapter.norm.weight" in sd,
                input_norm={**IMAGENET, "channels": sd["patch_embed.proj.weight"].shape[1]})
    sd = {f"net.{k}": v for k, v in sd.items()}
    return Converted("sam_vit", args, sd, Preprocess("radiograph_2d", 1024).record(), {"spatial_dims": 2})


register_format(Format(
    name="sam", architecture="sam_vit",
    source="Segment Anything / MedSAM / SAM-Med2D checkpoint (sam_vit_b_01ec64.pth, medsam_vit_b.pth, "
           "sam-med2d_b.pth with its adapters: image_encoder.*), or a timm samvit_* state dict",
    preprocess="RGB 0..255 by ImageNet mean/std (inside the encoder), 1024 px (SAM-Med2D: 256); CT: window first "
               "(MedSAM: W400 L40)",
    license="SAM: Apache-2.0; MedSAM: Apache-2.0",
    example="medfm finetune tasks/segment_2d.yaml --encoder medsam_vit_b.pth --data data/lgg_flair/manifest.csv ...",
    keys=(r"^(module\.)?(sam\.)?(image_encoder\.)?neck\.0\.weight$",  # flat, MedSAM-training and DDP layouts
          r"^(module\.)?(sam\.)?(image_encoder\.)?blocks\.0\.attn\.qkv\.weight$",
          r"^(module\.)?(sam\.)?(image_encoder\.)?pos_embed$"),
    convert=from_sam,
))
