"""Dense pretraining on the synthesis engine: voxel-wise contrastive on pairs, and supervised segmentation.

Voxel-wise contrastive pretraining on synthetic pairs (two appearances of one label map).

After Dey et al., "Learning General-Purpose Biomedical Volume Representations
using Randomized Synthesis" (ICLR 2025, https://arxiv.org/abs/2411.02372): the
engine renders one random label map twice with independent contrast; an
encoder with a dense decoder maps both to per-voxel features, and the loss
makes features at the same location agree across the two appearances while
features at locations of *different* labels disagree. Locations with the same
label are left out of the negatives (they may be the same tissue). The
encoder learns contrast-invariant, anatomy-aware features.

The dense network is the segmentation task's encoder-decoder (UNETR-style for a ViT,
U-Net-style for a ResNet), 2D or 3D. The paper uses a translation-equivariant CNN; with a
ViT alone (absolute position embeddings, 8^3 patches, no full-resolution path) the loss
stayed at log K at CPU scale (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medfm.run import TrainingModule
from medfm.run.recipe import split_kwargs
from medfm.heads import SegmentationModel

from .data import SynthSource, synth_config
from .method import PretrainMethod
from .registry import register_method


def dense_contrastive_loss(f1: torch.Tensor, f2: torch.Tensor, label: torch.Tensor, n_samples: int = 256,
                           temperature: float = 0.1, shift: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """InfoNCE over sampled locations: positives = the same anatomical location in the other appearance,
    negatives = locations with a different label; symmetric over the two directions, mean over the batch.

    ``f1``, ``f2``: (B, C, *spatial) features; ``label``: (B, 1, *spatial) or (B, *spatial) integer map in
    view-1 coordinates. ``shift`` (B, dims): view 2 is offset so that voxel ``v`` of view 1 is voxel
    ``v + shift`` of view 2 (independent crops defeat the shortcut of matching by absolute position);
    locations are sampled where both views overlap.
    """
    b, c, *spatial = f1.shape
    dims = len(spatial)
    z1, z2 = F.normalize(f1, dim=1), F.normalize(f2, dim=1)
    lab = label.reshape(b, *spatial)
    losses = []
    for i in range(b):
        d = [0] * dims if shift is None else [int(v) for v in shift[i]]
        lo = [max(0, -dd) for dd in d]
        sizes = [min(sz, sz - dd) - l for sz, dd, l in zip(spatial, d, lo)]
        n = math.prod(sizes)
        k = min(n_samples, n)
        flat = torch.randperm(n, generator=generator)[:k]
        coords = torch.stack(torch.unravel_index(flat, sizes), dim=1) + torch.tensor(lo)  # (k, dims) in view 1
        c1 = tuple(coords.T.to(f1.device))
        c2 = tuple((coords + torch.tensor(d)).T.to(f1.device))
        a, p = z1[i][(slice(None),) + c1].T, z2[i][(slice(None),) + c2].T  # (k, C)
        li = lab[i][c1]
        drop = (li[:, None] == li[None, :]) & ~torch.eye(k, dtype=torch.bool, device=f1.device)
        logits = (a @ p.T).float().div(temperature).masked_fill(drop, float("-inf"))
        target = torch.arange(k, device=f1.device)
        losses.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
    return torch.stack(losses).mean()


def dense_network(encoder: nn.Module, out_channels: int, feature_size: int = 16) -> nn.Module:
    """``encoder`` + the segmentation task's decoder (:class:`medfm.heads.SegmentationModel`:
    UNETR-style over a ViT, U-Net-style over a ResNet, with a full-resolution convolutional stem skip):
    (B, C_in, *spatial) -> (B, out_channels, *spatial). Pretraining and fine-tuning share one decoder, so a
    dense-pretrained encoder meets the architecture it was trained with."""
    return SegmentationModel(encoder, out_channels, feature_size=feature_size)


class _DenseEngineModule(TrainingModule):
    """Shared by the dense methods on the engine: ``self.model`` is a :func:`dense_network`."""

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder


@dataclass
class SynthContrastiveConfig:
    """``synth_contrastive`` recipe section."""

    feature_dim: int = 32  # per-voxel feature width
    n_samples: int = 256  # locations sampled per image for the InfoNCE
    temperature: float = 0.1
    max_shift: int = 8  # voxels: how far apart the two renderings of a pair are cropped
    feature_size: int = 16  # decoder width at full resolution


class SynthContrastiveModule(_DenseEngineModule):
    """Lightning module: batches of synthetic pairs (``image``, ``image2``, ``mask``, ``shift``) from the engine."""

    def __init__(self, encoder: nn.Module, **kwargs):
        c, optim = split_kwargs(SynthContrastiveConfig, kwargs)
        super().__init__(**optim)
        self.model = dense_network(encoder, c.feature_dim, c.feature_size)
        self.n_samples, self.temperature = c.n_samples, c.temperature

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x = torch.cat([batch["image"], batch["image2"]])
        f1, f2 = self.model(x).chunk(2)
        loss = dense_contrastive_loss(f1, f2, batch["mask"], self.n_samples, self.temperature,
                                      shift=batch.get("shift"))
        return loss, {}


@dataclass
class SynthSegConfig:
    """``synth_seg`` recipe section (the number of labels comes from ``data.synthetic.n_labels``)."""

    feature_size: int = 16  # decoder width at full resolution


class SynthSegModule(_DenseEngineModule):
    """Supervised segmentation pretraining on the engine's label maps (SynthSeg-style): the dense network
    predicts the label map of each synthetic image, MONAI's Dice + cross-entropy loss.

    Label identities are meaningful when maps come from templates (real segmentations, ``kind:
    template``) and in nested-shape maps (label k is the k-th nested structure); in noise maps the
    objective reduces to grouping voxels of equal appearance statistics."""

    def __init__(self, encoder: nn.Module, n_labels: int, **kwargs):
        c, optim = split_kwargs(SynthSegConfig, kwargs)
        super().__init__(**optim)
        self.model = dense_network(encoder, n_labels, c.feature_size)
        self.criterion = DiceCELoss(to_onehot_y=True, softmax=True)
        self.n_labels = n_labels

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.model(batch["image"])
        return self.criterion(logits.float(), batch["mask"]), {}


class _DenseMethod(PretrainMethod):
    """The engine renders the inputs at the encoder's size: no views."""

    def make_view(self, cfg: dict):
        return None


@register_method
class SynthContrastive(_DenseMethod):
    """``method: synth_contrastive``: synthetic pairs from the engine (``data.regime: synthetic``)."""

    name = "synth_contrastive"
    Config = SynthContrastiveConfig
    module_class = SynthContrastiveModule
    needs = "pairs"
    device_synthesis = False  # two renderings of a larger map, cropped apart: the CPU engine

    def synthetic_source(self, cfg: dict) -> SynthSource:
        """Pairs of renderings of one label map, cropped up to ``max_shift`` voxels apart."""
        return SynthSource(synth_config(cfg), cfg["seed"], pairs=True, max_shift=self.config(cfg).max_shift)


@register_method
class SynthSeg(_DenseMethod):
    """``method: synth_seg``: synthetic images with their label maps (``data.regime: synthetic``)."""

    name = "synth_seg"
    Config = SynthSegConfig
    module_class = SynthSegModule
    needs = "masks"

    def module_args(self, cfg: dict) -> dict:
        return {**super().module_args(cfg), "n_labels": synth_config(cfg).n_labels}
