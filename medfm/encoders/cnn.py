"""ResNet encoders: timm's ResNet for 2D, MONAI's ResNet for 3D, behind the ViT's API.

The network lives in ``self.net`` with its library's own parameter names, so a
timm (2D) or MONAI/MedicalNet (3D) state dict loads with the ``net.`` prefix.
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn as nn
from monai.networks import nets as monai_nets
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from .input_norm import input_layer
from .interface import EncoderBase
from .registry import register_encoder
from .weights import HEAD_PREFIXES


class ResNetEncoder(EncoderBase):
    """ResNet-{18,34,50} for 2D (timm) or 3D (MONAI), with pooled, map and multi-scale outputs.

    ``patch_size`` is the total stride (32), so feature maps are ``input / 32``;
    ``embed_dim`` is the channel count of the last stage.
    """

    feature_maps = "pyramid"
    lora_targets = None  # no default: a recipe names the convolutions (lora.target_modules: [conv1, conv2])
    input_conv = "net.conv1.weight"

    def __init__(self, spatial_dims: int = 2, depth: int = 18, in_chans: int = 1, img_size: int | Sequence[int] = 224,
                 input_norm: dict | None = None):
        super().__init__()
        if depth not in (18, 34, 50):
            raise ValueError(f"ResNet depth must be 18, 34 or 50, got {depth}")
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.img_size = img_size
        self.input_norm, net_chans = input_layer(in_chans, input_norm)  # a public model's normalisation
        if spatial_dims == 2:
            self.net = timm.create_model(f"resnet{depth}", num_classes=0, global_pool="", in_chans=net_chans)
            self._act_name = "act1"
        elif spatial_dims == 3:
            self.net = getattr(monai_nets, f"resnet{depth}")(
                spatial_dims=3, n_input_channels=net_chans, feed_forward=False, conv1_t_stride=2, shortcut_type="B", bias_downsample=False
            )
            self._act_name = "act"
        else:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.stages = [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4]
        self.embed_dim = self.num_features = 2048 if depth == 50 else 512
        self.patch_size = (32,) * spatial_dims
        self.grad_checkpointing = False

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay: stem, then one group per block of each stage."""
        return dict(stem=r"^net\.conv1|^net\.bn1", blocks=r"^net\.layer(\d+)" if coarse else r"^net\.layer(\d+)\.(\d+)")

    def encoder_blocks(self) -> list[nn.Module]:
        """The four stages."""
        return list(self.stages)

    def checkpoint_filter_fn(self, state_dict: dict[str, torch.Tensor], config: dict | None = None,
                             source_dims: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A timm (2D) or MONAI/MedicalNet (3D) state dict of the bare network: keys get the ``net.`` prefix."""
        own = self.state_dict()
        if set(state_dict) & set(own) or not any(f"net.{k}" in own for k in state_dict):
            return state_dict, []
        return {(f"net.{k}" if f"net.{k}" in own or k.startswith(HEAD_PREFIXES) else k): v
                for k, v in state_dict.items()}, ["prefixed keys with 'net.'"]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"ResNetEncoder(spatial_dims={self.spatial_dims}, in_chans={self.in_chans}) expects "
                f"(B, {self.in_chans}, *{self.spatial_dims} spatial dims), got shape {tuple(x.shape)}"
            )

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, self._act_name)(self.net.bn1(self.net.conv1(x)))

    def _stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[torch.Tensor]:
        """Feature maps (B, C, *spatial) at strides 2, 4, 8, 16, 32 (stem, then the four stages).

        ``indices`` selects among those five, as in :meth:`ViT.forward_intermediates`.
        """
        self._check_input(x)
        take, last = feature_take_indices(5, indices)
        x = self._stem(self.input_norm(x))
        maps = [x]
        x = self.net.maxpool(x)
        for stage in self.stages[:last]:
            x = self._stage(stage, x)
            maps.append(x)
        return [maps[i] for i in take]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map (B, embed_dim, *input/32)."""
        return self.forward_intermediates(x, indices=[-1])[0]



def _resnet(depth: int, spatial_dims: int, in_chans: int, img_size, input_norm: dict | None) -> ResNetEncoder:
    return ResNetEncoder(spatial_dims=spatial_dims, depth=depth, in_chans=in_chans, img_size=img_size,
                         input_norm=input_norm)


@register_encoder
def resnet18(spatial_dims: int = 2, in_chans: int = 1, img_size=224, input_norm: dict | None = None) -> ResNetEncoder:
    """ResNet-18: timm ``resnet18`` in 2D, MONAI ``resnet18`` (MedicalNet layout) in 3D."""
    return _resnet(18, spatial_dims, in_chans, img_size, input_norm)


@register_encoder
def resnet34(spatial_dims: int = 2, in_chans: int = 1, img_size=224, input_norm: dict | None = None) -> ResNetEncoder:
    """ResNet-34: timm ``resnet34`` in 2D, MONAI ``resnet34`` in 3D."""
    return _resnet(34, spatial_dims, in_chans, img_size, input_norm)


@register_encoder
def resnet50(spatial_dims: int = 2, in_chans: int = 1, img_size=224, input_norm: dict | None = None) -> ResNetEncoder:
    """ResNet-50: timm ``resnet50`` in 2D, MONAI ``resnet50`` in 3D (torchxrayvision's ResNet-50 converts here)."""
    return _resnet(50, spatial_dims, in_chans, img_size, input_norm)
