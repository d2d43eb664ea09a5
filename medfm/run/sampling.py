"""Step-keyed sampling: every sample a run draws is addressed by its *position* in the run.

A run reads an endless stream of sample positions 0, 1, 2, ... :class:`StepSampler` maps each position
to a dataset index (a fresh permutation per pass over the data, seeded) and :class:`KeyedDataset` seeds
every random transform of that sample from ``(seed, position)``. So what a run sees depends only on the
seed and the step: not on the number of DataLoader workers, not on which rank draws it, and not on
whether the run was stopped and resumed in between. Pretraining views, fine-tuning augmentation, the
synthetic engine and text-masking collators all go through this one path.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from medfm.data.volume import plain_tensor


def position_seed(seed: int, position: int) -> int:
    """A 32-bit seed for one sample position of a run (independent streams per position)."""
    return int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1)[0])


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
            raise ValueError("the training dataset is empty")
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


def _plain(v):
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return plain_tensor(v) if torch.is_tensor(v) else v


class KeyedDataset(Dataset):
    """Item ``(index, position)`` -> the training sample at that position, its randomness seeded by it.

    * ``dataset``: a sample dataset (dict samples; its own random ``post`` transforms, e.g. a preset's
      training augmentation, are re-seeded per position), or any indexable of dicts (token lists);
    * ``view``: a random view applied after loading (a MONAI ``Compose`` -> ``image``, or a multi-crop
      returning ``{"global": [...], "local": [...]}``); labels and text are kept beside the views;
    * ``synthetic`` (a callable ``position -> sample``, e.g. the randomized-synthesis engine) replaces
      the real ``dataset`` when that is None, or, with ``mix`` in (0, 1], replaces a real sample at a
      position with probability ``mix`` (decided from the seed and the position). Mixed batches carry
      no labels;
    * ``keys``: keep only these keys; ``position_key``: also return the position under that key (a
      collator that seeds its own randomness, e.g. MLM masking, reads it).

    ``meta`` is always dropped, so batches collate with torch's default collation.
    """

    def __init__(self, dataset: Dataset | Sequence | None, view: Callable | None = None, seed: int = 0,
                 synthetic: Callable[[int], dict | torch.Tensor] | None = None, mix: float = 0.0,
                 keys: Sequence[str] | None = None, position_key: str | None = None):
        if dataset is None and synthetic is None:
            raise ValueError("KeyedDataset needs a dataset, a synthetic source, or both")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix (fraction of synthetic samples) must be in [0, 1], got {mix}")
        self.dataset, self.view, self.seed = dataset, view, seed
        self.synthetic, self.mix = synthetic, mix if dataset is not None else 1.0
        self.keys, self.position_key = keys, position_key

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0

    def _real(self, index: int, seed: int) -> dict:
        base = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        for part in getattr(base, "datasets", [base]):  # a joined set: every part's augmentation
            post = getattr(part, "post", None)
            if post is not None and hasattr(post, "set_random_state"):
                post.set_random_state(seed=seed)
        sample = self.dataset[index]
        if self.synthetic is not None and self.mix > 0:
            sample = {"image": sample["image"]}
        return sample

    def _source(self, index: int, position: int, seed: int) -> dict:
        if self.synthetic is not None and (
            self.mix >= 1.0 or (self.mix > 0 and np.random.default_rng([self.seed, position, 1]).random() < self.mix)
        ):
            out = self.synthetic(position)
            return out if isinstance(out, dict) else {"image": out}
        return self._real(index, seed)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        seed = position_seed(self.seed, position)
        sample = self._source(index, position, seed)
        if self.view is None:
            out = {k: v for k, v in sample.items() if k != "meta"}
        else:
            self.view.set_random_state(seed=seed)
            views = self.view(torch.as_tensor(sample["image"]))
            out = dict(views) if isinstance(views, dict) else {"image": views}
            out.update({k: sample[k] for k in ("label", "text") if k in sample})
        if self.keys is not None:
            out = {k: v for k, v in out.items() if k in self.keys}
        out = {k: _plain(v) for k, v in out.items()}
        if self.position_key:
            out[self.position_key] = position
        return out


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_workers(num_workers: int | str) -> int:
    """DataLoader workers: ``"auto"`` = one per usable core but one (for the training loop), at most 8; a
    number is capped at the usable cores (more only compete with the training process; torch warns)."""
    cores = usable_cores()
    if num_workers == "auto":
        return min(max(cores - 1, 0), 8)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"data.num_workers must be 'auto' or a number >= 0, got {num_workers!r}")
    return min(num_workers, cores)


class StepData(L.LightningDataModule):
    """Endless, step-addressed training batches of a :class:`KeyedDataset`: every rank sees different
    samples, and a resumed run continues exactly where the stopped one would have gone. ``n`` is the
    number of indices (None: an endless source, index = position). ``num_workers``: see
    :func:`resolve_workers` (the sample order does not depend on it)."""

    def __init__(self, keyed: Dataset, n: int | None, batch_size: int, num_workers: int | str = 0, seed: int = 0,
                 collate_fn=None):
        super().__init__()
        self.keyed, self.n = keyed, n
        self.batch_size, self.num_workers, self.seed = batch_size, resolve_workers(num_workers), seed
        self.collate_fn = collate_fn

    def sampler(self, start_step: int = 0, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        return StepSampler(self.n, batch_size or self.batch_size, seed=self.seed, rank=rank,
                           world_size=world_size, start_step=start_step)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        return DataLoader(
            self.keyed,
            batch_size=self.batch_size,
            sampler=self.sampler(t.global_step, t.global_rank, t.world_size),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),  # keep the global RNG untouched
        )

    def fixed_samples(self, n: int, key: str = "image") -> torch.Tensor:
        """The ``key`` of the first ``n`` samples of the run (positions 0..n-1), for figures."""
        keys = iter(self.sampler(batch_size=n))
        return torch.stack([self.keyed[next(keys)][key] for _ in range(n)])
