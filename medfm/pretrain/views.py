"""Random views for self-supervised pretraining.

Each view is seeded from the sample's position in the run (:class:`medfm.run.KeyedDataset`), so the
views a run sees depend only on its seed and step. The views themselves are MONAI array transforms, one code path for 2D and 3D:
a random-resized crop (``RandScaleCrop`` + ``Resize``) for MAE, and DINO's
multi-crop (2 global + N local crops, with intensity jitter, blur and noise).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)
from monai.utils import ensure_tuple_rep

from medfm.synthetic.batched import to_device


def resized_crop(spatial_dims: int, size: int | Sequence[int], scale: tuple[float, float]) -> list:
    """Crop a random box whose side is ``scale[0]``..``scale[1]`` of the input's side (per axis), resize to ``size``."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    return [
        RandScaleCrop(roi_scale=lo, max_roi_scale=hi, random_size=True),
        Resize(ensure_tuple_rep(size, spatial_dims), mode="bilinear" if spatial_dims == 2 else "trilinear"),
    ]


def batch_resized_crop(x: torch.Tensor, rngs: Sequence[np.random.Generator], size: int | Sequence[int],
                       scale: tuple[float, float] = (0.5, 1.0), flip: bool = False) -> torch.Tensor:
    """:func:`resized_crop` (+ the optional flip of :func:`mae_view`) for a whole batch (B, C, *S) on its own
    device, one ``rng`` per sample drawing its box: each axis keeps a random ``scale`` fraction of the side at a
    random offset, resampled (bi/trilinear) to ``size`` through one ``grid_sample``."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    dims = x.ndim - 2
    size = ensure_tuple_rep(size, dims)
    theta = np.zeros((len(rngs), dims, dims + 1))
    for b, rng in enumerate(rngs):
        side = rng.uniform(lo, hi, dims)
        offset = rng.uniform(0, 1, dims) * (1 - side)
        mirror = -1.0 if flip and rng.random() < 0.5 else 1.0
        for row, axis in enumerate(reversed(range(dims))):  # affine_grid rows are (x, y[, z]): last axis first
            theta[b, row, row] = side[axis] * (mirror if axis == dims - 1 else 1.0)
            theta[b, row, dims] = 2 * offset[axis] - 1 + side[axis]
    grid = torch.nn.functional.affine_grid(to_device(theta, x.device, x.dtype),
                                           [x.shape[0], x.shape[1], *size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mae_view(spatial_dims: int, size: int | Sequence[int], scale: tuple[float, float] = (0.5, 1.0),
             flip: bool = False) -> Compose:
    """MAE's augmentation: a random-resized crop (no flips by default: anatomy is lateralised)."""
    steps = resized_crop(spatial_dims, size, scale)
    if flip:
        steps.append(RandFlip(prob=0.5, spatial_axis=spatial_dims - 1))
    return Compose(steps)


def _jitter(spatial_dims: int, blur_prob: float, noise_prob: float, intensity: bool = True) -> list:
    """DINO's photometric augmentation for grey-level scans: flip, intensity scale / shift / gamma (only with
    ``intensity``), blur, noise."""
    levels = [
        RandScaleIntensity(factors=0.3, prob=0.8),
        RandShiftIntensity(offsets=0.1, prob=0.8),
        RandAdjustContrast(gamma=(0.7, 1.5), prob=0.5),
    ] if intensity else []
    return [
        RandFlip(prob=0.5, spatial_axis=spatial_dims - 1),
        *levels,
        RandGaussianSmooth(sigma_x=(0.1, 1.5), sigma_y=(0.1, 1.5), sigma_z=(0.1, 1.5), prob=blur_prob),
        RandGaussianNoise(std=0.05, prob=noise_prob),
    ]


class MultiCrop:
    """DINO's multi-crop: ``n_global`` large crops (for teacher and student) and ``n_local`` small ones (student only).

    Scales are fractions of the input side per axis (DINO's area fractions
    0.4-1 / 0.05-0.4 in 2D correspond to sides of about 0.6-1 / 0.2-0.6).
    ``intensity_jitter: false`` leaves grey levels as they are (no intensity scale, shift or gamma), for
    tasks where brightness itself may carry the finding (opacities on a radiograph); on PneumoniaMNIST it made
    the features worse, not better (benchmarks/RESULTS.md). Returns ``{"global": [views], "local": [views]}``.
    """

    def __init__(
        self,
        spatial_dims: int,
        global_size: int | Sequence[int] = 224,
        local_size: int | Sequence[int] = 96,
        n_global: int = 2,
        n_local: int = 6,
        global_scale: tuple[float, float] = (0.6, 1.0),
        local_scale: tuple[float, float] = (0.25, 0.6),
        intensity_jitter: bool = True,
    ):
        if n_global < 1:
            raise ValueError(f"DINO needs at least one global crop, got n_global={n_global}")
        if n_global + n_local < 2:
            raise ValueError("DINO needs at least two crops in total (global + local)")
        g = resized_crop(spatial_dims, global_size, global_scale)
        loc = resized_crop(spatial_dims, local_size, local_scale)
        # as in DINO, the first global crop is always blurred and the second rarely
        self.globals = [Compose(g + _jitter(spatial_dims, 1.0 if i == 0 else 0.1, 0.2, intensity_jitter))
                        for i in range(n_global)]
        self.locals = [Compose(loc + _jitter(spatial_dims, 0.5, 0.2, intensity_jitter)) for _ in range(n_local)]

    def set_random_state(self, seed: int) -> None:
        rs = np.random.RandomState(seed)
        for t in self.globals + self.locals:
            t.set_random_state(seed=int(rs.randint(2**31)))

    def __call__(self, image: torch.Tensor) -> dict:
        return {"global": [t(image) for t in self.globals], "local": [t(image) for t in self.locals]}
