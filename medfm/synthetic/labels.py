"""Random label maps for randomized synthesis, 2D and 3D from one code path.

Label maps are the "anatomy" of a synthetic sample: integer maps with labels
``0..n_labels-1``. Three generators, after the randomized-synthesis papers
(SynthSeg, Billot et al. 2023; Dey et al. 2024, "Learning general-purpose
biomedical volume representations using randomized synthesis"):

* ``noise``: the argmax of ``n_labels`` smooth random fields (organic, space-filling regions);
* ``shapes``: nested random ellipsoids and tubes on a background (compact organs, vessels);
* a user's own label maps (e.g. real segmentations) deformed at random (:func:`elastic_deform`).

Every function takes a ``numpy.random.Generator``: the same generator state gives the same map.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _mode(dims: int) -> str:
    return "bilinear" if dims == 2 else "trilinear"


def smooth_fields(shape: Sequence[int], n: int, scale: float, rng: np.random.Generator) -> torch.Tensor:
    """``n`` smooth Gaussian random fields (n, *shape): white noise on a grid ``scale`` times coarser, upsampled."""
    coarse = [max(2, int(round(s / scale))) for s in shape]
    z = torch.from_numpy(rng.standard_normal((1, n, *coarse)).astype(np.float32))
    return F.interpolate(z, size=tuple(shape), mode=_mode(len(shape)), align_corners=True)[0]


def _grid(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Voxel coordinates (dims, *shape), float."""
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32, device=device) for s in shape],
                                      indexing="ij"))


def _ensure_all_labels(label: torch.Tensor, n_labels: int, rng: np.random.Generator) -> torch.Tensor:
    """Plant a small ball of every label that the generator left out, so a map always has ``n_labels`` labels."""
    present = set(torch.unique(label).tolist())
    missing = [k for k in range(n_labels) if k not in present]
    if not missing:
        return label
    grid = _grid(label.shape)
    radius = max(1.0, min(label.shape) / 10)
    for k in missing:
        centre = torch.tensor([rng.uniform(radius, s - radius) for s in label.shape]).view(-1, *[1] * label.ndim)
        label[((grid - centre) ** 2).sum(0) <= radius**2] = k
    return label


def noise_labels(shape: Sequence[int], n_labels: int, rng: np.random.Generator, scale: float | None = None) -> torch.Tensor:
    """Argmax of ``n_labels`` smooth random fields; ``scale`` (voxels) sets the region size (default: side / 6)."""
    scale = scale or min(shape) / 6
    fields = smooth_fields(shape, n_labels, scale, rng)
    # running arg-max over the fields: element-wise passes, ~10x faster than argmax(0) on (K, D, H, W)
    best, label = fields[0].clone(), torch.zeros(tuple(shape), dtype=torch.long)
    for k in range(1, n_labels):
        win = fields[k] > best
        best = torch.where(win, fields[k], best)
        label.masked_fill_(win, k)
    return _ensure_all_labels(label, n_labels, rng)


def shape_labels(shape: Sequence[int], n_labels: int, rng: np.random.Generator) -> torch.Tensor:
    """Background 0 with labels 1.. as nested random ellipsoids (largest first) and the odd tube."""
    dims = len(shape)
    grid = _grid(shape)
    size = torch.tensor(shape, dtype=torch.float32).view(-1, *[1] * dims)
    label = torch.zeros(tuple(shape), dtype=torch.long)
    for k in range(1, n_labels):
        frac = 0.45 * (1 - 0.6 * (k - 1) / max(n_labels - 1, 1))  # later labels are smaller (nested)
        if k > 1 and rng.random() < 0.25:  # a tube: a thick random line through the volume
            p = torch.from_numpy(rng.uniform(0.2, 0.8, dims).astype(np.float32)).view(-1, *[1] * dims) * size
            d = torch.from_numpy(rng.standard_normal(dims).astype(np.float32))
            d = (d / d.norm()).view(-1, *[1] * dims)
            rel = grid - p
            dist2 = (rel**2).sum(0) - (rel * d).sum(0) ** 2
            label[dist2 <= (min(shape) * rng.uniform(0.03, 0.07)) ** 2] = k
            continue
        centre = torch.from_numpy(rng.uniform(0.3, 0.7, dims).astype(np.float32)).view(-1, *[1] * dims) * size
        radii = torch.from_numpy(rng.uniform(0.5, 1.0, dims).astype(np.float32)).view(-1, *[1] * dims) * frac * size
        label[(((grid - centre) / radii) ** 2).sum(0) <= 1] = k
    return _ensure_all_labels(label, n_labels, rng)


def elastic_deform(label: torch.Tensor, rng: np.random.Generator, magnitude: float = 0.05,
                   scale: float | None = None) -> torch.Tensor:
    """A random smooth deformation of a label map (nearest-neighbour resampling keeps labels integral).

    ``magnitude``: displacement std as a fraction of the side; ``scale``: smoothness in voxels.
    """
    shape = label.shape
    dims = len(shape)
    scale = scale or min(shape) / 4
    disp = smooth_fields(shape, dims, scale, rng) * (2 * magnitude)  # in normalised [-1, 1] units
    base = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    coords = (base + disp).flip(0)  # grid_sample wants (x, y[, z]) = last axis first
    coords = coords.permute(*range(1, dims + 1), 0)[None]
    out = F.grid_sample(label[None, None].float(), coords, mode="nearest", padding_mode="border", align_corners=True)
    return out[0, 0].long()


def random_label_map(shape: Sequence[int], n_labels: int, rng: np.random.Generator, kind: str = "mixed",
                     templates: Sequence[torch.Tensor] | None = None, deform: float = 0.05) -> tuple[torch.Tensor, str]:
    """One label map and the generator used: ``noise``, ``shapes``, ``mixed`` (either, at random) or
    ``template`` (a random one of ``templates``, relabelled to ``0..n_labels-1`` if needed, deformed)."""
    if n_labels < 2:
        raise ValueError(f"n_labels must be at least 2 (background + one structure), got {n_labels}")
    if kind == "mixed":
        kind = "noise" if rng.random() < 0.5 else "shapes"
    if kind == "noise":
        label = noise_labels(shape, n_labels, rng)
    elif kind == "shapes":
        label = shape_labels(shape, n_labels, rng)
    elif kind == "template":
        if not templates:
            raise ValueError("kind='template' needs label maps in `templates`")
        t = torch.as_tensor(templates[int(rng.integers(len(templates)))]).long()
        if tuple(t.shape) != tuple(shape):
            t = F.interpolate(t[None, None].float(), size=tuple(shape), mode="nearest")[0, 0].long()
        values = torch.unique(t)
        t = torch.searchsorted(values, t) % n_labels  # relabel to 0..K-1 (folded if the template has more)
        label = _ensure_all_labels(t, n_labels, rng)
    else:
        raise ValueError(f"unknown label-map kind {kind!r}: noise, shapes, mixed or template")
    if deform > 0:
        label = elastic_deform(label, rng, magnitude=deform)
        label = _ensure_all_labels(label, n_labels, rng)
    return label, kind
