"""The segmentation model: a UNETR-style decoder for token encoders (ViTs), a U-Net-style decoder for pyramid
encoders (CNNs), 2D and 3D from one code path. Shared by the segmentation task
(:mod:`medfm.finetune.segmentation`) and the dense synthetic pretraining method
(:mod:`medfm.pretrain.synth_contrastive`).

The encoder's ``forward_intermediates`` gives feature maps; each becomes the skip connection of one decoder
level (stride 1 from the image itself, then strides 2, 4, ... up to the encoder's total stride). ViT token
maps are brought to their level's resolution with MONAI's ``UnetrPrUpBlock`` (transposed convolutions, as in
UNETR: Hatamizadeh et al., WACV 2022); CNN maps already have them and are only projected. Decoding is MONAI's
``UnetrUpBlock`` (upsample, concatenate the skip, residual convolutions) at every level, then a 1x1
convolution to class logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import DynUNet, SegResNetDS, SwinUNETR

from .task_model import TaskModel, build_task_encoder


def _is_vit(encoder: nn.Module) -> bool:
    """Token maps from every block at one stride (UNETR decoder), or a pyramid of strides (U-Net decoder)."""
    return encoder.feature_maps == "tokens"


class SegmentationModel(TaskModel, nn.Module):
    """``encoder`` + decoder: (B, C, *spatial) -> (B, num_classes, *spatial) logits.

    Inputs must be divisible by the encoder's total stride (the ViT patch size, isotropic; 32 for ResNets). Built by a run from its spec
    (:meth:`from_spec`), it saves and reloads as an artifact (:class:`medfm.heads.TaskModel`).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, feature_size: int = 16, norm: str = "instance"):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        dims, fs = encoder.spatial_dims, feature_size
        if _is_vit(encoder):
            patch = set(encoder.patch_size)
            p = next(iter(patch))
            if len(patch) != 1 or p < 2:
                raise ValueError(f"the UNETR decoder needs an isotropic patch size, got {encoder.patch_size}")
            k = math.ceil(math.log2(p))  # DINOv2's 14: four levels, decoded at stride 16 (see forward)
            depth = len(encoder.encoder_blocks())
            # one block per level, evenly spaced, the last block at the bottom (UNETR: 3, 6, 9, 12 of 12)
            self.indices = [max(0, round(depth * j / k) - 1) for j in range(1, k + 1)]
            if len(set(self.indices)) < k:
                raise ValueError(f"a patch size of {p} needs {k} decoder levels, hence at least {k} blocks; "
                                 f"the encoder has {depth}")
            bottom = encoder.embed_dim
            self.skips = nn.ModuleList([
                UnetrPrUpBlock(dims, encoder.embed_dim, fs * 2**j, num_layer=k - j - 1, kernel_size=3, stride=1,
                               upsample_kernel_size=2, norm_name=norm)
                for j in range(1, k)
            ])
        else:
            was = encoder.training
            with torch.no_grad():  # a dry run in eval mode (no BatchNorm statistics touched) gives the widths
                probe = torch.zeros(1, encoder.in_chans, *([32] * dims))
                channels = [m.shape[1] for m in encoder.eval().forward_intermediates(probe)]
            encoder.train(was)
            k = len(channels)  # strides 2 .. 2^k
            self.indices = list(range(k))
            bottom = channels[-1]
            self.skips = nn.ModuleList([
                UnetrBasicBlock(dims, channels[j - 1], fs * 2**j, kernel_size=1, stride=1, norm_name=norm)
                for j in range(1, k)
            ])
        self.levels = k
        self.stem = UnetrBasicBlock(dims, encoder.in_chans, fs, kernel_size=3, stride=1, norm_name=norm, res_block=True)
        ups, ch = [], bottom
        for j in reversed(range(k)):
            ups.append(UnetrUpBlock(dims, ch, fs * 2**j, kernel_size=3, upsample_kernel_size=2, norm_name=norm,
                                    res_block=True))
            ch = fs * 2**j
        self.ups = nn.ModuleList(ups)
        self.out = UnetOutBlock(dims, fs, num_classes)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if _is_vit(self.encoder):
            return self.encoder.forward_intermediates(x, indices=self.indices, norm=True)
        return self.encoder.forward_intermediates(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size. Decoding doubles the encoder's grid ``levels`` times; a patch that is not
        a power of two (DINOv2's 14) gives a grid x 16 that is not the input size, so the stem reads the image
        resampled to it and the logits are resampled back (bilinear / trilinear)."""
        feats = self.encode(x)
        size = tuple(x.shape[2:])
        decoded = tuple(g * 2**self.levels for g in feats[-1].shape[2:])
        mode = "bilinear" if len(size) == 2 else "trilinear"
        image = x if decoded == size else F.interpolate(x, size=decoded, mode=mode, align_corners=False)
        skips = [self.stem(image)] + [blk(f) for blk, f in zip(self.skips, feats[:-1])]
        h = feats[-1]
        for up, skip in zip(self.ups, reversed(skips)):
            h = up(h, skip)
        logits = self.out(h)
        return logits if decoded == size else F.interpolate(logits, size=size, mode=mode, align_corners=False)

    @property
    def stride(self) -> int:
        """What inputs must be divisible by: the ViT's patch, or the pyramid's total stride."""
        return self.encoder.patch_size[0] if _is_vit(self.encoder) else 2**self.levels

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None):
        """The spec's network: this model (``network: unetr``, the default) or a :class:`PlannedUNet`."""
        h = spec["head"]
        network = h.get("network", "unetr")
        if network == "dynunet":
            return PlannedUNet.from_spec(spec, pretrained, folder)
        if network in BACKBONE_FAMILIES:
            return BackboneNetwork.from_spec(spec, pretrained, folder)
        model = cls(build_task_encoder(spec, pretrained), h["num_classes"], h["feature_size"])
        model.spec = spec
        return model


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights of the full-resolution output and the ``n - 1`` coarser ones: 1/2^i, normalised."""
    w = [0.5**i for i in range(n)]
    return [v / sum(w) for v in w]


class PlannedUNet(TaskModel, nn.Module):
    """MONAI's ``DynUNet`` (the nnU-Net architecture: per-stage kernels and strides, instance norm, leaky ReLU,
    deep supervision) as a task model: (B, C, *spatial) -> (B, num_classes, *spatial) logits; in training with
    deep supervision (B, heads, num_classes, *spatial), the coarser heads upsampled to the input's size.

    ``kernel_size`` / ``strides``: one entry per stage (:mod:`medfm.finetune.planning` derives them from the data);
    ``feature_size``: the first stage's width, doubled per stage up to 320 (nnU-Net's 32 .. 320). The network is
    trained whole from random initialisation: it has no medfm encoder (``encoder`` is None)."""

    encoder = None
    MAX_FILTERS = 320

    def __init__(self, spatial_dims: int, in_chans: int, num_classes: int, kernel_size: list, strides: list,
                 feature_size: int = 32, deep_supervision: bool = True):
        super().__init__()
        self.num_classes, self.spatial_dims = num_classes, spatial_dims
        stages = len(strides)
        filters = [min(feature_size * 2**j, self.MAX_FILTERS) for j in range(stages)]
        self.deep_supervision = bool(deep_supervision) and stages > 2
        self.network = DynUNet(spatial_dims, in_chans, num_classes, kernel_size, strides, strides[1:], filters=filters,
                               deep_supervision=self.deep_supervision, deep_supr_num=max(1, stages - 2),
                               res_block=False)
        self.stride_per_axis = [math.prod(s[i] if isinstance(s, (list, tuple)) else s for s in strides)
                                for i in range(spatial_dims)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    @property
    def stride(self) -> int:
        """What inputs must be divisible by (the largest of the per-axis products of the strides)."""
        return max(self.stride_per_axis)

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "PlannedUNet":
        h, e = spec["head"], spec["encoder"]
        model = cls(e["spatial_dims"], e["in_chans"], h["num_classes"], h["kernel_size"], h["strides"],
                    h["feature_size"], h.get("deep_supervision", True))
        model.spec = spec
        return model


# MONAI networks whose encoder is a medfm encoder family: the network -> the family its encoder must be
BACKBONE_FAMILIES = {"segresnet": "segres_encoder", "swinunetr": "swin_vit"}


class _Borrowed(nn.Module):
    """Stands in a MONAI network for the encoder it built: calls the medfm encoder that the task model owns
    (``call(encoder, x, *args)``) without registering it a second time, so its weights are saved once, under
    ``encoder.``, and LoRA, freezing and layer decay see one encoder."""

    def __init__(self, owner: nn.Module, call):
        super().__init__()
        self.__dict__["_owner"] = owner  # a plain attribute, not a submodule
        self.call = call

    def forward(self, x: torch.Tensor, *args):
        return self.call(self.__dict__["_owner"], x, *args)


class BackboneNetwork(TaskModel, nn.Module):
    """A MONAI segmentation network with a medfm encoder as its encoder: ``segresnet`` is MONAI's
    ``SegResNetDS`` (SegResNet with deep supervision; its encoder a ``segres_encoder``: random, medfm-pretrained
    or CT-FM's), ``swinunetr`` MONAI's ``SwinUNETR`` (its encoder a ``swin_vit``: random, medfm-pretrained or
    SwinUNETR's self-supervised weights). The decoder is what MONAI builds for that encoder's widths; the encoder
    is the medfm one, so tuning methods (LoRA, a frozen probe) and ``encoder/`` exports apply as to any task model.

    (B, C, *spatial) -> (B, num_classes, *spatial) logits; a SegResNetDS in training with deep supervision
    gives (B, heads, num_classes, *spatial), its coarser heads upsampled to the input's size (nnU-Net's
    1/2^i-weighted losses, as :class:`PlannedUNet`)."""

    def __init__(self, encoder: nn.Module, network: str, num_classes: int, deep_supervision: bool = True):
        super().__init__()
        family = BACKBONE_FAMILIES.get(network)
        if family is None:
            raise ValueError(f"network {network!r}: one of {', '.join(BACKBONE_FAMILIES)}")
        needs = {"segresnet": "init_filters", "swinunetr": "depths"}[network]
        if not hasattr(encoder, needs):
            raise ValueError(f"segmentation.network={network} builds its encoder from a {family} (MONAI's own); "
                             f"got a {type(encoder).__name__}: name encoder.name={family}, give --encoder weights of that family, or "
                             "use network unetr (any medfm encoder)")
        self.encoder, self.num_classes, self.network_name = encoder, num_classes, network
        dims = encoder.spatial_dims
        if network == "segresnet":
            levels = len(encoder.blocks_down)
            self.deep_supervision = bool(deep_supervision) and levels > 2
            self.network = SegResNetDS(dims, encoder.init_filters, encoder.in_chans, num_classes, act=encoder.act_name,
                                       norm=encoder.norm_name, blocks_down=encoder.blocks_down,
                                       dsdepth=levels - 1 if self.deep_supervision else 1)
            self.network.encoder = _Borrowed(encoder, lambda enc, x: enc.net(x))  # every level, stride 1 first
        else:
            self.deep_supervision = False  # SwinUNETR has one output
            self.network = SwinUNETR(encoder.in_chans, num_classes, patch_size=2, depths=encoder.depths,
                                     num_heads=encoder.num_heads, window_size=encoder.window_size,
                                     feature_size=encoder.feature_size, spatial_dims=dims)
            self.network.swinViT = _Borrowed(encoder, lambda enc, x, normalize: enc.net(x, normalize))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if isinstance(out, (list, tuple)):  # SegResNetDS's deep supervision in training: full resolution first
            size, mode = tuple(x.shape[2:]), "bilinear" if x.ndim == 4 else "trilinear"
            out = torch.stack([o if tuple(o.shape[2:]) == size else F.interpolate(o, size=size, mode=mode,
                                                                                   align_corners=False)
                               for o in out], 1)
        return out

    @property
    def stride(self) -> int:
        """What inputs must be divisible by: the encoder's total stride (SegResNet 2^(levels-1), Swin 32)."""
        return self.encoder.patch_size[0]

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "BackboneNetwork":
        h = spec["head"]
        model = cls(build_task_encoder(spec, pretrained), h["network"], h["num_classes"], h.get("deep_supervision", True))
        model.spec = spec
        return model
