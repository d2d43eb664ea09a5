"""The randomized-synthesis engine: label map + random appearance -> a sample dict, deterministic per (seed, index).

``synth_sample(config, seed, index)`` always returns the same sample for the
same arguments, whichever process, worker or rank calls it; ``synth_pair``
renders one label map twice with independent appearances (same anatomy,
different contrast) for contrastive pretraining. :class:`SyntheticDataset`
is the endless stream for training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from medfm.data.volume import plain_tensor

from .appearance import render
from .labels import random_label_map


@dataclass
class SynthConfig:
    """What to synthesise: ``spatial_dims`` 2 or 3, ``size`` per side, ``n_labels`` (incl. background 0),
    the label-map ``kind`` (noise | shapes | mixed | template), optional ``templates`` (label maps to
    deform), the elastic ``deform`` magnitude and overrides of the appearance ``ranges``."""

    spatial_dims: int = 3
    size: int | Sequence[int] = 64
    n_labels: int = 8
    kind: str = "mixed"
    deform: float = 0.05
    ranges: dict = field(default_factory=dict)
    templates: list | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.size
        return (int(s),) * self.spatial_dims if isinstance(s, (int, np.integer)) else tuple(int(v) for v in s)


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(stream)])


def _label(config: SynthConfig, seed: int, index: int) -> tuple[torch.Tensor, str]:
    if config.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {config.spatial_dims}")
    return random_label_map(config.shape, config.n_labels, _rng(seed, index, 0), kind=config.kind,
                            templates=config.templates, deform=config.deform)


def synth_sample(config: SynthConfig, seed: int = 0, index: int = 0) -> dict:
    """``{"image": (1, *shape) in [0, 1], "mask": (1, *shape) int64 label map, "meta": {...}}``."""
    label, kind = _label(config, seed, index)
    image, params = render(label, config.n_labels, _rng(seed, index, 1), config.ranges)
    meta = {"seed": int(seed), "index": int(index), "label_kind": kind, "n_labels": config.n_labels,
            "spatial_dims": config.spatial_dims, "appearance": params}
    return {"image": plain_tensor(image), "mask": label[None], "meta": meta}


def synth_pair(config: SynthConfig, seed: int = 0, index: int = 0) -> dict:
    """One label map, two independent appearances: ``image``, ``image2`` (same anatomy), ``mask``, ``meta``."""
    label, kind = _label(config, seed, index)
    a, pa = render(label, config.n_labels, _rng(seed, index, 1), config.ranges)
    b, pb = render(label, config.n_labels, _rng(seed, index, 2), config.ranges)
    meta = {"seed": int(seed), "index": int(index), "label_kind": kind, "n_labels": config.n_labels,
            "spatial_dims": config.spatial_dims, "appearance": pa, "appearance2": pb}
    return {"image": plain_tensor(a), "image2": plain_tensor(b), "mask": label[None], "meta": meta}


class SyntheticDataset(IterableDataset):
    """Endless synthetic samples (or pairs). Sample indices are split over ranks and DataLoader workers:
    worker ``w`` of rank ``r`` (of ``R`` ranks with ``W`` workers each) makes indices
    ``start + r*W + w + k*R*W``, so no two workers repeat a sample and the stream is reproducible."""

    def __init__(self, config: SynthConfig, seed: int = 0, pairs: bool = False, start: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_meta: bool = False):
        self.config, self.seed, self.pairs, self.start = config, seed, pairs, start
        self.rank, self.world_size, self.drop_meta = rank, world_size, drop_meta

    def _rank(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def indices(self) -> Iterator[int]:
        rank, world = self._rank()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start + rank * nw + wid
        while True:
            yield i
            i += world * nw

    def __iter__(self):
        make = synth_pair if self.pairs else synth_sample
        for i in self.indices():
            s = make(self.config, self.seed, i)
            if self.drop_meta:
                s.pop("meta")
            yield s
