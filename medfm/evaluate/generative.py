"""Metrics of generated images and volumes against real ones, each named for what it measures.

* **Fréchet distance** and **MMD** (the polynomial-kernel MMD of KID) between real and generated samples
  in the feature space of a *named medfm encoder* (torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance`` with that encoder as the feature extractor). There are no Inception
  weights offline, and these are not FIDs: compare them only with the same distance between two
  disjoint real sets of the same size (``real_vs_real``), never with published numbers.
* **Diversity**: mean MS-SSIM over random pairs of generated samples, against the same figure over real
  pairs (higher = more alike; a collapsed generator is near 1). MONAI's MS-SSIM, with as many scales
  and as large a kernel as the image size allows (five scales need 160 px and more).
* **Memorisation**: for each generated sample the nearest training image (RMS pixel distance), against
  the same distance for held-out real images: a generator that copies its training set has generated
  samples much closer to the training set than new real images are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.metrics import MultiScaleSSIMMetric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from medfm.figures import pyplot, save_figure

from .plots import middle_slice

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales


class EncoderFeatures(nn.Module):
    """A medfm encoder as a feature extractor for torchmetrics: images in [0, 1] -> pooled embeddings,
    resized to the encoder's input size when they differ."""

    def __init__(self, encoder: nn.Module, size: int | Sequence[int] | None = None):
        super().__init__()
        self.encoder = encoder.eval()
        self.num_features = int(encoder.embed_dim)
        self.size = size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.size is not None:
            size = (self.size,) * (x.ndim - 2) if isinstance(self.size, int) else tuple(self.size)
            if tuple(x.shape[2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False)
        return self.encoder(x.to(next(self.encoder.parameters()).device)).float().cpu()


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def feature_distances(features: EncoderFeatures, real: torch.Tensor, fake: torch.Tensor,
                      batch_size: int = 64, kid_subset: int = 100) -> dict:
    """Fréchet distance and MMD (KID's polynomial kernel, mean and std over subsets) between ``real`` and
    ``fake`` in ``features``' space."""
    fd = FrechetInceptionDistance(feature=features, normalize=True)
    n = min(len(real), len(fake))
    kid = KernelInceptionDistance(feature=features, normalize=True, subset_size=min(kid_subset, n))
    for metric in (fd, kid):
        for b in _batches(real, batch_size):
            metric.update(b, real=True)
        for b in _batches(fake, batch_size):
            metric.update(b, real=False)
    mmd_mean, mmd_std = kid.compute()
    return {"frechet": float(fd.compute()), "mmd": float(mmd_mean), "mmd_std": float(mmd_std), "n_real": len(real),
            "n_generated": len(fake)}


def ms_ssim_metric(spatial_shape: Sequence[int]) -> MultiScaleSSIMMetric:
    """MONAI's MS-SSIM with the most scales (up to 5) and the largest kernel (up to 11) the size allows:
    MONAI needs ``(kernel - 1) * 2 ** (scales - 1) < side``."""
    side = min(spatial_shape)
    for scales in range(5, 0, -1):
        for kernel in (11, 9, 7, 5, 3):
            if (kernel - 1) * 2 ** (scales - 1) < side and (scales >= 3 or kernel <= 7):
                w = MS_SSIM_WEIGHTS[:scales]
                w = tuple(v / sum(w) for v in w)
                return MultiScaleSSIMMetric(spatial_dims=len(spatial_shape), data_range=1.0, kernel_size=kernel, weights=w)
    raise ValueError(f"images of size {tuple(spatial_shape)} are too small for MS-SSIM")


def pairwise_ms_ssim(images: torch.Tensor, pairs: int = 200, seed: int = 0) -> dict:
    """Mean and std of MS-SSIM over ``pairs`` random pairs of distinct samples."""
    n = len(images)
    if n < 2:
        raise ValueError("diversity needs at least two samples")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # never the same sample
    metric = ms_ssim_metric(images.shape[2:])
    vals = torch.cat([metric(images[i[k:k + 64]].float(), images[j[k:k + 64]].float()).flatten()
                      for k in range(0, pairs, 64)])
    vals = vals[torch.isfinite(vals)]
    return {"ms_ssim": float(vals.mean()), "ms_ssim_std": float(vals.std()), "pairs": int(len(vals)),
            "scales": len(metric.weights), "kernel": metric.kernel_size if isinstance(metric.kernel_size, int) else metric.kernel_size[0]}


def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the RMS pixel distance to its nearest reference and that reference's index."""
    ref = references.flatten(1).float()
    dists, idx = [], []
    for q in _batches(queries.flatten(1).float(), batch_size):
        d = torch.cdist(q, ref) / math.sqrt(ref.shape[1])
        v, k = d.min(1)
        dists.append(v)
        idx.append(k)
    return torch.cat(dists), torch.cat(idx)


def memorisation(generated: torch.Tensor, heldout: torch.Tensor, train: torch.Tensor) -> dict:
    """Nearest-training-image distances of generated samples against those of held-out real images."""
    d_gen, i_gen = nearest_neighbours(generated, train)
    d_real, _ = nearest_neighbours(heldout, train)
    q = float(torch.quantile(d_real, 0.05))
    return {
        "generated_median": float(d_gen.median()), "heldout_median": float(d_real.median()),
        "generated_min": float(d_gen.min()), "heldout_min": float(d_real.min()),
        "heldout_p05": q, "fraction_closer_than_heldout_p05": float((d_gen < q).float().mean()),
        "distances": d_gen, "heldout_distances": d_real, "nearest": i_gen,
    }


def memorisation_png(result: dict, generated: torch.Tensor, train: torch.Tensor, path: str | Path, k: int = 8) -> Path:
    """Left: histograms of nearest-training-image distances (generated vs held-out real); right: the ``k``
    closest generated/training pairs (middle slices of volumes)."""
    plt = pyplot()
    d, nn_idx = result["distances"], result["nearest"]
    order = torch.argsort(d)[:k]
    fig = plt.figure(figsize=(3.2 + 1.3 * len(order), 3.2))
    grid = fig.add_gridspec(2, 2 + len(order), width_ratios=[2.5, 0.2] + [1] * len(order))
    ax = fig.add_subplot(grid[:, 0])
    bins = np.linspace(0, float(max(d.max(), result["heldout_distances"].max())), 30)
    ax.hist(result["heldout_distances"].numpy(), bins=bins, alpha=0.6, label="held-out real", density=True)
    ax.hist(d.numpy(), bins=bins, alpha=0.6, label="generated", density=True)
    ax.set_xlabel("RMS distance to nearest training image")
    ax.legend(fontsize=7)
    for c, g in enumerate(order.tolist()):
        top, bottom = fig.add_subplot(grid[0, 2 + c]), fig.add_subplot(grid[1, 2 + c])
        top.imshow(middle_slice(generated[g]), cmap="gray", vmin=0, vmax=1)
        bottom.imshow(middle_slice(train[int(nn_idx[g])]), cmap="gray", vmin=0, vmax=1)
        top.set_title(f"d={float(d[g]):.3f}", fontsize=7)
        top.set_axis_off()
        bottom.set_axis_off()
    fig.text(0.99, 0.02, "top: generated, bottom: nearest training image", ha="right", fontsize=7)
    return save_figure(fig, path, dpi=100)
