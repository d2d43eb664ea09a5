"""torchxrayvision's chest X-ray models as medfm encoders, from a state dict the user exports.

torchxrayvision's release files are whole pickled modules, which medfm never unpickles (they can run code):
export once where torchxrayvision runs, ``torch.save(xrv.models.DenseNet(weights="densenet121-res224-all")
.state_dict(), "xrv_densenet.pth")``, and point ``--encoder`` at that file.

* **DenseNet-121** (``densenet121-res224-*``): the registered ``densenet121`` family, MONAI's ``DenseNet121``
  features in 2D or 3D (one code path; 2D weights inflate to 3D like every 2D kernel in medfm), whose
  pooled output is torchxrayvision's ``features2`` (ReLU, global average). The torchvision key names
  (``denselayer1.conv1``) become MONAI's (``denselayer1.layers.conv1``).
* **ResNet-50** (``resnet50-res512-all``): a torchvision ResNet-50 with a one-channel stem, i.e. medfm's own
  ``resnet50`` (timm names are torchvision's).

Both read torchxrayvision's input range, [-1024, 1024], through :class:`InputNorm` (``(x - 0.5) * 2048``
on medfm's [0, 1] images); their classifier (18 pathologies) is dropped, the encoder ends at the pooled map.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from medfm.data import Preprocess

from .formats import Checkpoint, Converted, Format, register_format, rename, strip_prefix
from .input_norm import input_layer
from .interface import EncoderBase
from .registry import register_encoder

XRV_NORM = {"channels": 1, "mean": [0.5], "std": [1 / 2048]}  # [0, 1] -> torchxrayvision's [-1024, 1024]
XRV_PREPROCESS = "one grey channel scaled to [-1024, 1024] (inside the encoder), {size} px"


class DenseNetEncoder(EncoderBase):
    """DenseNet-121 features (MONAI's, 2D or 3D) with maps at strides 2 (stem), 4, 8, 16, 32 (dense blocks)."""

    feature_maps = "pyramid"
    lora_targets = r".*denselayer\d+\.layers\.conv[12]"  # peft's convolution LoRA on every dense layer
    input_conv = "net.features.conv0.weight"

    def __init__(self, spatial_dims: int = 2, in_chans: int = 1, img_size: int | Sequence[int] = 224,
                 input_norm: dict | None = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims, self.in_chans, self.img_size = spatial_dims, in_chans, img_size
        self.input_norm, net_chans = input_layer(in_chans, input_norm)
        self.net = DenseNet121(spatial_dims=spatial_dims, in_channels=net_chans, out_channels=1)
        del self.net.class_layers  # the encoder ends at the pooled map
        f = self.net.features
        self.stages = [f.denseblock1, nn.Sequential(f.transition1, f.denseblock2),
                       nn.Sequential(f.transition2, f.denseblock3), nn.Sequential(f.transition3, f.denseblock4, f.norm5)]
        self.embed_dim = self.num_features = f.norm5.num_features
        self.patch_size = (32,) * spatial_dims

    def encoder_blocks(self) -> list[nn.Module]:
        """The four dense blocks (with the transitions before them)."""
        return list(self.stages)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer-wise LR decay groups: the stem, each dense block with the transition after it, ``norm5``."""
        return dict(stem=r"^net\.features\.(?:conv0|norm0)",
                    blocks=[(r"^net\.features\.(?:denseblock|transition)(\d+)", None), (r"^net\.features\.norm5", (99999,))])

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[torch.Tensor]:
        """Feature maps at strides 2, 4, 8, 16, 32: the stem (conv, BN, ReLU), then each dense block; the last
        one after ``norm5`` and a ReLU (torchxrayvision pools that)."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(f"DenseNetEncoder(spatial_dims={self.spatial_dims}, in_chans={self.in_chans}) expects "
                             f"(B, {self.in_chans}, *{self.spatial_dims} spatial dims), got shape {tuple(x.shape)}")
        take, last = feature_take_indices(5, indices)
        f = self.net.features
        x = f.relu0(f.norm0(f.conv0(self.input_norm(x))))
        maps = [x]
        x = f.pool0(x)
        for i, stage in enumerate(self.stages[:last]):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and torch.is_grad_enabled() else stage(x)
            maps.append(F.relu(x) if i == 3 else x)
        return [maps[i] for i in take]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map (B, 1024, *input/32), after ``norm5`` and ReLU."""
        return self.forward_intermediates(x, indices=[-1])[0]


@register_encoder
def densenet121(spatial_dims: int = 2, in_chans: int = 1, img_size=224, input_norm: dict | None = None) -> DenseNetEncoder:
    """DenseNet-121 (MONAI, 2D / 3D): torchxrayvision's chest X-ray DenseNets convert here."""
    return DenseNetEncoder(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, input_norm=input_norm)


def from_xrv_densenet(ckpt: Checkpoint) -> Converted:
    sd = strip_prefix(ckpt.state_dict, "module.", "model.")
    sd = rename(sd, [(r"(denselayer\d+)\.(norm|relu|conv)(\d)\.", r"\1.layers.\2\3."), (r"^features\.", "net.features.")],
                drop=(r"^classifier\.", r"^op_threshs$"))
    return Converted("densenet121", {"input_norm": XRV_NORM}, sd, Preprocess("radiograph_2d", 224).record(),
                     {"spatial_dims": 2})


def from_xrv_resnet(ckpt: Checkpoint) -> Converted:
    sd = strip_prefix(ckpt.state_dict, "module.", "model.")
    sd = {f"net.{k}": v for k, v in sd.items() if not k.startswith(("fc.", "op_threshs"))}
    return Converted("resnet50", {"input_norm": XRV_NORM}, sd, Preprocess("radiograph_2d", 512).record(),
                     {"spatial_dims": 2})


def _one_channel(key: str):
    """A format check: the first convolution (``key``, under any prefix) takes one channel, as in torchxrayvision."""
    return lambda ckpt: any(k.endswith(key) and v.ndim == 4 and v.shape[1] == 1 for k, v in ckpt.state_dict.items())


register_format(Format(
    name="xrv-densenet121", architecture="densenet121",
    source="torchxrayvision DenseNet state dict (densenet121-res224-all, -chex, -mimic_nb, ...)",
    preprocess=XRV_PREPROCESS.format(size=224),
    license="Apache-2.0 (code); weights: the terms of each training set (NIH, CheXpert, MIMIC-CXR, PadChest)",
    example="medfm finetune tasks/classify_2d.yaml --encoder xrv_densenet.pth --method full --data data/pneumoniamnist/...",
    keys=(r"^(module\.|model\.)?features\.denseblock1\.denselayer1\.conv1\.weight$", r"^(module\.|model\.)?features\.norm5\.weight$"),
    convert=from_xrv_densenet, accepts=_one_channel("features.conv0.weight"),
))
register_format(Format(
    name="xrv-resnet50", architecture="resnet50",
    source="torchxrayvision ResNet state dict (resnet50-res512-all: a torchvision ResNet-50, one-channel stem)",
    preprocess=XRV_PREPROCESS.format(size=512),
    license="Apache-2.0 (code); weights: the terms of each training set",
    example="medfm finetune tasks/classify_2d.yaml --encoder xrv_resnet50.pth --method full --data ...",
    keys=(r"^(module\.|model\.)?layer4\.2\.conv3\.weight$", r"^(module\.|model\.)?conv1\.weight$", r"^(module\.|model\.)?fc\.weight$"),
    convert=from_xrv_resnet, accepts=_one_channel("conv1.weight"),
))
