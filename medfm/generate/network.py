"""The noise-prediction network of a generator, from its spec: diffusers' UNets in 2D, MONAI's in 3D.

* 2D, unconditional / class / mask: diffusers ``UNet2DModel`` (classes through ``num_class_embeds``);
* 2D, text: diffusers ``UNet2DConditionModel`` (cross-attention on the text encoder's token states,
  ``cross_attention_dim`` = the text width);
* 3D (or ``backbone: monai`` in 2D): MONAI ``DiffusionModelUNet`` (``num_class_embeds`` for classes,
  ``with_conditioning`` + ``cross_attention_dim`` for text).

Mask conditioning adds the label map, one-hot, as input channels (every backbone). Class conditioning
keeps one extra embedding, index ``num_classes``, for "no class" (classifier-free guidance).
:class:`Denoiser` gives all of them one call: ``denoiser(x, t, class_labels=None, context=None)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .spec import DiffusionSpec


def input_channels(spec: DiffusionSpec) -> int:
    """Image channels plus, for mask conditioning, one channel per label value."""
    return spec.in_chans + (spec.mask_classes if spec.conditioning == "mask" else 0)


def backbone(spec: DiffusionSpec) -> str:
    """``diffusers`` or ``monai``: ``auto`` means diffusers in 2D and MONAI in 3D."""
    choice = spec.backbone
    if choice == "auto":
        return "diffusers" if spec.spatial_dims == 2 else "monai"
    if choice not in ("diffusers", "monai"):
        raise ValueError(f"diffusion.backbone must be auto | diffusers | monai, got {choice!r}")
    if choice == "diffusers" and spec.spatial_dims != 2:
        raise ValueError("diffusion.backbone=diffusers is 2D only; 3D uses MONAI's DiffusionModelUNet")
    return choice


def _diffusers_unet(spec: DiffusionSpec, text_dim: int | None) -> nn.Module:
    from diffusers import UNet2DConditionModel, UNet2DModel

    channels, attention = tuple(spec.channels), list(spec.attention)
    common = dict(sample_size=spec.image_size, in_channels=input_channels(spec), out_channels=spec.in_chans,
                  layers_per_block=spec.layers_per_block, block_out_channels=channels,
                  norm_num_groups=spec.norm_groups)
    if spec.conditioning == "text":
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
        # UNet2DConditionModel's "attention_head_dim" is the number of heads per level
        heads = tuple(max(c // spec.head_channels, 1) for c in channels)
        return UNet2DConditionModel(down_block_types=down, up_block_types=up, cross_attention_dim=text_dim,
                                    attention_head_dim=heads, **common)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    classes = spec.num_classes + 1 if spec.conditioning == "class" else None
    return UNet2DModel(down_block_types=down, up_block_types=up, attention_head_dim=spec.head_channels,
                       num_class_embeds=classes, **common)


def _monai_unet(spec: DiffusionSpec, text_dim: int | None) -> nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    text = spec.conditioning == "text"
    return DiffusionModelUNet(
        spatial_dims=spec.spatial_dims, in_channels=input_channels(spec), out_channels=spec.in_chans,
        num_res_blocks=spec.layers_per_block, channels=tuple(spec.channels),
        attention_levels=tuple(spec.attention), norm_num_groups=spec.norm_groups,
        num_head_channels=spec.head_channels, with_conditioning=text, cross_attention_dim=text_dim if text else None,
        num_class_embeds=spec.num_classes + 1 if spec.conditioning == "class" else None,
        use_flash_attention=True,  # torch's scaled_dot_product_attention instead of an explicit einsum + softmax
    )


class Denoiser(nn.Module):
    """One call for every backbone: ``(x, t, class_labels, context) -> prediction`` (noise or v)."""

    def __init__(self, spec: DiffusionSpec, text_dim: int | None = None):
        super().__init__()
        if len(spec.channels) != len(spec.attention):
            raise ValueError(f"diffusion.channels ({len(spec.channels)} levels) and diffusion.attention "
                             f"({len(spec.attention)}) must have one entry per level")
        if any(c % spec.norm_groups for c in spec.channels):
            raise ValueError(f"diffusion.channels {spec.channels} must all be multiples of norm_groups "
                             f"({spec.norm_groups})")
        self.kind = backbone(spec)
        self.unet = _diffusers_unet(spec, text_dim) if self.kind == "diffusers" else _monai_unet(spec, text_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "monai":
            return self.unet(x, t, context=context, class_labels=class_labels)
        if context is not None:
            return self.unet(x, t, encoder_hidden_states=context).sample
        return self.unet(x, t, class_labels=class_labels).sample
