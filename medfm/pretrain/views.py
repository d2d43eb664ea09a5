"""Random views for self-supervised pretraining, reproducible per sample position.

A pretraining run reads an endless stream of sample *positions* 0, 1, 2, ...
:class:`StepSampler` maps each position to a dataset index (a fresh permutation
per pass over the data, seeded) and :class:`ViewDataset` seeds the random view
transform from ``(seed, position)``. So the views a run sees depend only on the
seed and the step: not on the number of DataLoader workers, not on which rank
draws them, and not on whether the run was stopped and resumed in between.

The views themselves are MONAI array transforms, one code path for 2D and 3D:
a random-resized crop (``RandScaleCrop`` + ``Resize``) for MAE, and DINO's
multi-crop (2 global + N local crops, with intensity jitter, blur and noise).
"""

from __future__ import annotations

from typing import Iterator, Sequence

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
from torch.utils.data import Dataset, Sampler

from medfm.data.volume import plain_tensor


def _tuple(size: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (int(size),) * n if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)


def resized_crop(spatial_dims: int, size: int | Sequence[int], scale: tuple[float, float]) -> list:
    """Crop a random box whose side is ``scale[0]``..``scale[1]`` of the input's side (per axis), resize to ``size``."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    return [
        RandScaleCrop(roi_scale=lo, max_roi_scale=hi, random_size=True),
        Resize(_tuple(size, spatial_dims), mode="bilinear" if spatial_dims == 2 else "trilinear"),
    ]


def mae_view(spatial_dims: int, size: int | Sequence[int], scale: tuple[float, float] = (0.5, 1.0),
             flip: bool = False) -> Compose:
    """MAE's augmentation: a random-resized crop (no flips by default: anatomy is lateralised)."""
    steps = resized_crop(spatial_dims, size, scale)
    if flip:
        steps.append(RandFlip(prob=0.5, spatial_axis=spatial_dims - 1))
    return Compose(steps)


def _jitter(spatial_dims: int, blur_prob: float, noise_prob: float) -> list:
    return [
        RandFlip(prob=0.5, spatial_axis=spatial_dims - 1),
        RandScaleIntensity(factors=0.3, prob=0.8),
        RandShiftIntensity(offsets=0.1, prob=0.8),
        RandAdjustContrast(gamma=(0.7, 1.5), prob=0.5),
        RandGaussianSmooth(sigma_x=(0.1, 1.5), sigma_y=(0.1, 1.5), sigma_z=(0.1, 1.5), prob=blur_prob),
        RandGaussianNoise(std=0.05, prob=noise_prob),
    ]


class MultiCrop:
    """DINO's multi-crop: ``n_global`` large crops (for teacher and student) and ``n_local`` small ones (student only).

    Scales are fractions of the input side per axis (DINO's area fractions
    0.4-1 / 0.05-0.4 in 2D correspond to sides of about 0.6-1 / 0.2-0.6).
    Returns ``{"global": [views], "local": [views]}``.
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
    ):
        if n_global < 1:
            raise ValueError(f"DINO needs at least one global crop, got n_global={n_global}")
        if n_global + n_local < 2:
            raise ValueError("DINO needs at least two crops in total (global + local)")
        g = resized_crop(spatial_dims, global_size, global_scale)
        loc = resized_crop(spatial_dims, local_size, local_scale)
        # as in DINO, the first global crop is always blurred and the second rarely
        self.globals = [Compose(g + _jitter(spatial_dims, 1.0 if i == 0 else 0.1, 0.2)) for i in range(n_global)]
        self.locals = [Compose(loc + _jitter(spatial_dims, 0.5, 0.2)) for _ in range(n_local)]

    def set_random_state(self, seed: int) -> None:
        rs = np.random.RandomState(seed)
        for t in self.globals + self.locals:
            t.set_random_state(seed=int(rs.randint(2**31)))

    def __call__(self, image: torch.Tensor) -> dict:
        return {"global": [t(image) for t in self.globals], "local": [t(image) for t in self.locals]}


def position_seed(seed: int, position: int) -> int:
    """A 32-bit seed for one sample position of a run (independent streams per position)."""
    return int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1)[0])


class ViewDataset(Dataset):
    """Wraps a sample dataset: item ``(index, position)`` -> the random view(s) of that sample.

    ``view`` is a MONAI ``Compose`` (output under ``image``) or a :class:`MultiCrop`
    (output under ``global`` / ``local``). Labels are kept; ``meta`` is dropped
    so that batches collate with torch's default collation.

    Data regimes: ``synthetic`` (a callable ``position -> sample``, e.g. the
    randomized-synthesis engine) replaces the real ``dataset`` when that is
    None, or, with ``mix`` in (0, 1], replaces a real sample at a position with
    probability ``mix`` (decided from the seed and the position, so reproducibly).
    Mixed batches carry no labels. ``view=None`` passes samples through unchanged
    (minus ``meta``), for methods whose source already makes their inputs.
    """

    def __init__(self, dataset: Dataset | None, view, seed: int = 0, synthetic=None, mix: float = 0.0):
        if dataset is None and synthetic is None:
            raise ValueError("ViewDataset needs a dataset, a synthetic source, or both")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix (fraction of synthetic samples) must be in [0, 1], got {mix}")
        self.dataset, self.view, self.seed = dataset, view, seed
        self.synthetic, self.mix = synthetic, mix if dataset is not None else 1.0

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0

    def _source(self, index: int, position: int) -> dict:
        if self.synthetic is not None and (
            self.mix >= 1.0 or (self.mix > 0 and np.random.default_rng([self.seed, position, 1]).random() < self.mix)
        ):
            out = self.synthetic(position)
            return out if isinstance(out, dict) else {"image": out}
        sample = self.dataset[index]
        if self.synthetic is not None and self.mix > 0:
            sample = {"image": sample["image"]}
        return sample

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        sample = self._source(index, position)
        if self.view is None:  # the source already made what the method needs (e.g. synthetic pairs)
            return {k: plain_tensor(v) for k, v in sample.items() if k != "meta"}
        image = torch.as_tensor(sample["image"])
        self.view.set_random_state(seed=position_seed(self.seed, position))
        views = self.view(image)
        out = dict(views) if isinstance(views, dict) else {"image": views}
        out = {k: ([plain_tensor(x) for x in v] if isinstance(v, list) else plain_tensor(v)) for k, v in out.items()}
        for key in ("label", "text"):  # text: a report or caption paired with the image (CLIP)
            if key in sample:
                out[key] = sample[key]
        return out


class StepSampler(Sampler):
    """Endless ``(index, position)`` keys for one rank, starting at ``start_step``.

    Positions are global: batch ``s`` of rank ``r`` holds positions
    ``s * B * world + r * B + k`` (``k < B``), and position ``p`` reads index
    ``perm[p // n][p % n]`` where ``perm[e]`` is a permutation seeded by ``(seed, e)``.
    Every rank therefore sees different samples, and resuming at a step
    continues exactly where the stopped run would have gone. ``n=None`` (an
    endless synthetic source): index = position.
    """

    def __init__(self, n: int | None, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        if n is not None and n < 1:
            raise ValueError("the pretraining dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, position: int) -> int:
        if self.n is None:  # an endless source (synthetic): index = position
            return position
        epoch = position // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][position % self.n])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        b, w = self.batch_size, self.world_size
        while True:
            base = step * b * w + self.rank * b
            for k in range(b):
                yield self._index(base + k), base + k
            step += 1
