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

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import PretrainModule

MAX_SHIFT = 8  # voxels: how far apart the two renderings of a pair are cropped (default)


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
    """``encoder`` + the segmentation task's decoder (:class:`medfm.tasks.segmentation.SegmentationModel`:
    UNETR-style over a ViT, U-Net-style over a ResNet, with a full-resolution convolutional stem skip):
    (B, C_in, *spatial) -> (B, out_channels, *spatial). Pretraining and fine-tuning share one decoder, so a
    dense-pretrained encoder meets the architecture it was trained with."""
    from medfm.tasks.segmentation import SegmentationModel

    return SegmentationModel(encoder, out_channels, feature_size=feature_size)


class _DenseEngineModule(PretrainModule):
    """Shared by the dense methods on the engine: ``self.model`` is a :func:`dense_network`; no views
    (the engine renders the inputs at the encoder's size)."""

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @staticmethod
    def make_view(spatial_dims: int, size, **kwargs):
        return None


class SynthContrastiveModule(_DenseEngineModule):
    """Lightning module: batches of synthetic pairs (``image``, ``image2``, ``mask``, ``shift``) from the engine."""

    needs_pairs = True

    def __init__(self, encoder: nn.Module, feature_dim: int = 32, n_samples: int = 256, temperature: float = 0.1,
                 max_shift: int = MAX_SHIFT, feature_size: int = 16, **optim):
        super().__init__(**optim)
        self.model = dense_network(encoder, feature_dim, feature_size)
        self.n_samples, self.temperature = n_samples, temperature
        self.max_shift = max_shift  # read by the data source: the two renderings are cropped this far apart

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x = torch.cat([batch["image"], batch["image2"]])
        f1, f2 = self.model(x).chunk(2)
        loss = dense_contrastive_loss(f1, f2, batch["mask"], self.n_samples, self.temperature,
                                      shift=batch.get("shift"))
        return loss, {}


class SynthSegModule(_DenseEngineModule):
    """Supervised segmentation pretraining on the engine's label maps (SynthSeg-style): the dense network
    predicts the label map of each synthetic image, MONAI's Dice + cross-entropy loss.

    Label identities are meaningful when maps come from templates (real segmentations, ``kind:
    template``) and in nested-shape maps (label k is the k-th nested structure); in noise maps the
    objective reduces to grouping voxels of equal appearance statistics."""

    needs_mask = True

    def __init__(self, encoder: nn.Module, n_labels: int = 8, feature_size: int = 16, **optim):
        from monai.losses import DiceCELoss

        super().__init__(**optim)
        self.model = dense_network(encoder, n_labels, feature_size)
        self.criterion = DiceCELoss(to_onehot_y=True, softmax=True)
        self.n_labels = n_labels

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.model(batch["image"])
        return self.criterion(logits.float(), batch["mask"]), {}
