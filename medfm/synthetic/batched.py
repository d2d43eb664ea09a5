"""The randomized-synthesis engine on the training device: whole batches of label maps and images in torch.

The same generative model as the per-sample CPU engine (:mod:`.labels`, :mod:`.appearance`: noise or shape
label maps, elastic deformation, every label present, Gaussian-mixture appearance with partial volume, bias
field, gamma, blur, thick slices, Gaussian or Rician noise, inversion; the same :data:`~.appearance.RANGES`),
written as batched tensor operations so a GPU renders a batch of 128^3 volumes in milliseconds where a CPU
worker needs a second per volume. The parameters of each sample are drawn on the host from
``(seed, index)``; its random fields (coarse noise, voxel noise) come from a device generator seeded from
``(seed, index)`` too, and every batched operation works per sample (the smoothing kernels are zero beyond
each sample's own radius), so a sample is the same whichever batch renders it. The draws differ from the CPU
engine's, so the two engines give different samples from the same distribution (tested: parameter ranges,
label counts, intensity statistics).

    batch = synth_batch(SynthConfig(spatial_dims=3, size=128), seed=0, indices=range(8), device="cuda")
    batch["image"].shape  # (8, 1, 128, 128, 128), in [0, 1];  batch["mask"]: int64 label maps
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .appearance import RANGES
from .engine import SynthConfig
from .labels import _grid, _mode

_DEVICE_STREAM = 7  # seed-sequence stream of the device fields (the CPU engine uses 0-2)
_PARAM_STREAM = 8  # seed-sequence stream of the host-drawn parameters


def _host_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), _PARAM_STREAM])


def _device_generator(seed: int, index: int, device: torch.device, stream: int = _DEVICE_STREAM) -> torch.Generator:
    s = int(np.random.SeedSequence([int(seed), int(index), stream]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(s & (2**63 - 1))


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host-drawn numbers as a tensor on ``device``: through pinned memory without blocking on a GPU, so
    rendering never waits for the training kernels already queued (a pageable copy would)."""
    t = torch.as_tensor(np.asarray(values), dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _upsampled_noise(gens: list[torch.Generator], channels: int, shape: Sequence[int], scale: float,
                     device: torch.device) -> torch.Tensor:
    """(B, channels, *shape) smooth random fields: per-sample white noise on a grid ``scale`` times coarser,
    upsampled (the CPU engine's ``smooth_fields``)."""
    coarse = [max(2, int(round(s / scale))) for s in shape]
    z = torch.stack([torch.randn(channels, *coarse, generator=g, device=device) for g in gens])
    return F.interpolate(z, size=tuple(shape), mode=_mode(len(shape)), align_corners=True)


def gaussian_smooth(x: torch.Tensor, sigma: Sequence[float], truncated: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, *S) with one sigma per sample (voxels; <= 0.05: unchanged), as
    MONAI's ``GaussianSmooth`` (kernel radius ``truncated * sigma``, zero padding). Written as shifted sums so
    it is deterministic on every device, with each sample's taps zero beyond its own radius. ``sigma`` are
    host numbers (the drawn parameters), so nothing is read back from the device."""
    radii = [int(truncated * s + 0.5) if s > 0.05 else 0 for s in sigma]
    r = max(radii, default=0)
    if r == 0:
        return x
    offsets = np.arange(-r, r + 1, dtype=np.float64)
    taps = np.zeros((len(radii), 2 * r + 1))
    for j, (s, rad) in enumerate(zip(sigma, radii)):
        w = np.exp(-0.5 * (offsets / max(s, 1e-3)) ** 2) * (np.abs(offsets) <= rad)
        taps[j] = w / w.sum()
    w = to_device(taps, x.device, x.dtype)
    dims = x.ndim - 2
    view = (-1,) + (1,) * (dims + 1)
    for axis in range(2, x.ndim):
        pad = [0, 0] * dims
        pad[2 * (x.ndim - 1 - axis)] = pad[2 * (x.ndim - 1 - axis) + 1] = r
        xp = F.pad(x, pad)
        n = x.shape[axis]
        out = torch.zeros_like(x)
        for j in range(2 * r + 1):
            out.addcmul_(xp.narrow(axis, j, n), w[:, j].view(view))
        x = out
    return x


def _per_sample(x: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` of the per-sample spatial values: (B, ...) -> (B, 1, ..., 1)."""
    flat = x.reshape(x.shape[0], -1)
    return fn(flat).view(-1, *([1] * (x.ndim - 1)))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    lo = _per_sample(x, lambda f: f.amin(1))
    hi = _per_sample(x, lambda f: f.amax(1))
    return (x - lo) / (hi - lo).clamp_min(1e-6)


# ------------------------------------------------------------------ label maps
def _noise_labels(gens, shape, n_labels, device) -> torch.Tensor:
    fields = _upsampled_noise(gens, n_labels, shape, min(shape) / 6, device)
    return fields.argmax(1)


def _shape_labels(rngs: list[np.random.Generator], shape, n_labels, device) -> torch.Tensor:
    """Nested random ellipsoids (largest first) and the odd tube, as the CPU engine's ``shape_labels``;
    the per-sample parameters are drawn on the host, the masks for the whole batch at once."""
    dims, b = len(shape), len(rngs)
    size = to_device(shape, device, torch.float32)
    grid = _grid(shape, device)[None]  # (1, dims, *S)
    label = torch.zeros((b, *shape), dtype=torch.long, device=device)
    sp = (1,) * dims
    for k in range(1, n_labels):
        frac = 0.45 * (1 - 0.6 * (k - 1) / max(n_labels - 1, 1))
        tube, centre, radii, direction, thick = [], [], [], [], []
        for rng in rngs:
            is_tube = k > 1 and rng.random() < 0.25
            tube.append(is_tube)
            if is_tube:
                p = rng.uniform(0.2, 0.8, dims)
                d = rng.standard_normal(dims)
                centre.append(p), radii.append(np.ones(dims)), direction.append(d / np.linalg.norm(d))
                thick.append(rng.uniform(0.03, 0.07))
            else:
                centre.append(rng.uniform(0.3, 0.7, dims)), radii.append(rng.uniform(0.5, 1.0, dims))
                direction.append(np.zeros(dims)), thick.append(0.0)
        c = to_device(centre, device, torch.float32) * size  # (B, dims)
        rel = grid - c.view(b, dims, *sp)
        r = to_device(radii, device, torch.float32) * frac * size
        ellipsoid = ((rel / r.view(b, dims, *sp)) ** 2).sum(1) <= 1
        d = to_device(direction, device, torch.float32).view(b, dims, *sp)
        dist2 = (rel**2).sum(1) - (rel * d).sum(1) ** 2
        th = to_device(thick, device, torch.float32).view(b, *sp) * min(shape)
        is_tube = to_device(tube, device).view(b, *sp)
        mask = torch.where(is_tube, dist2 <= th**2, ellipsoid)
        label = torch.where(mask, torch.full_like(label, k), label)
    return label


def _elastic(label: torch.Tensor, gens, magnitude: float) -> torch.Tensor:
    """Random smooth deformations of (B, *S) label maps, nearest-neighbour (the CPU engine's ``elastic_deform``)."""
    b, shape = label.shape[0], tuple(label.shape[1:])
    dims = len(shape)
    disp = _upsampled_noise(gens, dims, shape, min(shape) / 4, label.device) * (2 * magnitude)
    base = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s, device=label.device) for s in shape], indexing="ij"))
    coords = (base[None] + disp).flip(1)  # grid_sample wants (x, y[, z]) = last axis first
    coords = coords.permute(0, *range(2, dims + 2), 1)
    out = F.grid_sample(label[:, None].float(), coords, mode="nearest", padding_mode="border", align_corners=True)
    return out[:, 0].long()


def _ensure_all_labels(label: torch.Tensor, n_labels: int, rngs: list[np.random.Generator]) -> torch.Tensor:
    """Plant a small ball of every label a map lacks (its centre drawn per sample and label on the host)."""
    b, shape = label.shape[0], tuple(label.shape[1:])
    dims = len(shape)
    present = torch.zeros((b, n_labels), dtype=torch.bool, device=label.device)  # (B, K), no (B, N, K) one-hot
    present.scatter_(1, label.reshape(b, -1), True)
    radius = max(1.0, min(shape) / 10)
    centres = to_device([[[rng.uniform(radius, s - radius) for s in shape] for _ in range(n_labels)] for rng in rngs],
                        label.device, torch.float32)  # (B, K, dims)
    grid = _grid(shape, label.device)[None]
    sp = (1,) * dims
    for k in range(n_labels):
        ball = ((grid - centres[:, k].view(b, dims, *sp)) ** 2).sum(1) <= radius**2
        plant = ball & ~present[:, k].view(b, *sp)
        label = torch.where(plant, torch.full_like(label, k), label)
    return label


def label_maps(config: SynthConfig, seed: int, indices: Sequence[int], device: torch.device | str = "cpu",
               ) -> tuple[torch.Tensor, list[str]]:
    """(B, *shape) int64 label maps for ``indices`` and the generator each used (noise | shapes | template)."""
    device = torch.device(device)
    shape, k = config.shape, config.n_labels
    if config.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {config.spatial_dims}")
    if k < 2:
        raise ValueError(f"n_labels must be at least 2 (background + one structure), got {k}")
    rngs = [_host_rng(seed, i) for i in indices]
    gens = [_device_generator(seed, i, device) for i in indices]
    kinds = []
    for rng in rngs:
        kind = config.kind
        if kind == "mixed":
            kind = "noise" if rng.random() < 0.5 else "shapes"
        if kind not in ("noise", "shapes", "template"):
            raise ValueError(f"unknown label-map kind {kind!r}: noise, shapes, mixed or template")
        kinds.append(kind)
    label = torch.zeros((len(rngs), *shape), dtype=torch.long, device=device)
    for kind in set(kinds):
        sel = [j for j, kd in enumerate(kinds) if kd == kind]
        if kind == "noise":
            part = _noise_labels([gens[j] for j in sel], shape, k, device)
        elif kind == "shapes":
            part = _shape_labels([rngs[j] for j in sel], shape, k, device)
        else:
            if not config.templates:
                raise ValueError("kind='template' needs label maps in `templates`")
            maps = []
            for j in sel:
                t = torch.as_tensor(config.templates[int(rngs[j].integers(len(config.templates)))]).long().to(device)
                if tuple(t.shape) != tuple(shape):
                    t = F.interpolate(t[None, None].float(), size=tuple(shape), mode="nearest")[0, 0].long()
                maps.append(torch.searchsorted(torch.unique(t), t) % k)
            part = torch.stack(maps)
        label[to_device(sel, device)] = part
    label = _ensure_all_labels(label, k, rngs)
    if config.deform > 0:
        label = _elastic(label, gens, config.deform)
        label = _ensure_all_labels(label, k, rngs)
    return label, kinds


# ------------------------------------------------------------------ appearance
def _draw_appearance(rng: np.random.Generator, n_labels: int, dims: int, r: dict) -> dict:
    """One sample's appearance parameters, from the same ranges as the CPU engine's ``render``."""
    u = lambda key, size=None: rng.uniform(*r[key], size)  # noqa: E731
    p = {"mean": u("mean", n_labels).tolist(), "std": u("std", n_labels).tolist(),
         "partial_volume_sigma": float(u("partial_volume_sigma")), "bias": float(u("bias")),
         "gamma": float(u("gamma")), "blur_sigma": float(u("blur_sigma")), "lowres_axis": None, "lowres_factor": 1.0}
    if rng.random() < r["lowres_prob"]:
        p["lowres_axis"], p["lowres_factor"] = int(rng.integers(dims)), float(u("lowres_factor"))
    p["noise_std"] = float(u("noise_std"))
    p["noise"] = "rician" if rng.random() < r["rician_prob"] else "gaussian"
    p["inverted"] = bool(rng.random() < r["invert_prob"])
    return p


def render_batch(label: torch.Tensor, n_labels: int, params: list[dict], gens: list[torch.Generator]) -> torch.Tensor:
    """(B, 1, *S) images in [0, 1] for (B, *S) label maps and each sample's drawn ``params``."""
    b, shape = label.shape[0], tuple(label.shape[1:])
    dims, dev = len(shape), label.device
    col = lambda key: to_device([p[key] for p in params], dev, torch.float32)  # noqa: E731
    sp = (1,) * dims
    # partial volume: the CPU engine blurs the K one-hot channels and weights them by each label's mean and std;
    # blurring is linear, so that equals blurring the two maps mean[label] and std[label] (2 channels, not K)
    means = to_device([p["mean"] for p in params], dev, torch.float32)  # (B, K)
    stds = to_device([p["std"] for p in params], dev, torch.float32)
    flat = label.reshape(b, -1)
    maps = torch.stack([means.gather(1, flat), stds.gather(1, flat)], 1).view(b, 2, *shape)
    maps = gaussian_smooth(maps, [p["partial_volume_sigma"] for p in params])
    texture = torch.stack([torch.randn(shape, generator=g, device=dev) for g in gens])
    image = maps[:, 0] + maps[:, 1] * texture  # (B, *S)
    bias = _upsampled_noise(gens, 1, shape, min(shape) / 3, dev)[:, 0]
    image = _normalise(image * torch.exp(col("bias").view(b, *sp) * bias))[:, None]
    # gamma as MONAI's AdjustContrast: ((x - min) / range) ** gamma * range + min
    lo = _per_sample(image, lambda f: f.amin(1))
    rng_ = _per_sample(image, lambda f: f.amax(1)) - lo
    image = ((image - lo) / (rng_ + 1e-7)).clamp_min(0) ** col("gamma").view(b, 1, *sp) * rng_ + lo
    image = gaussian_smooth(image, [p["blur_sigma"] for p in params])
    for j, p in enumerate(params):  # thick slices: per sample (axis and factor differ)
        if p["lowres_axis"] is not None:
            small = list(shape)
            small[p["lowres_axis"]] = max(1, int(math.ceil(shape[p["lowres_axis"]] / p["lowres_factor"])))
            down = F.interpolate(image[j : j + 1], size=tuple(small), mode="area")
            image[j : j + 1] = F.interpolate(down, size=shape, mode=_mode(dims))
    std = col("noise_std").view(b, 1, *sp)
    n1 = torch.stack([torch.randn((1, *shape), generator=g, device=dev) for g in gens]) * std
    n2 = torch.stack([torch.randn((1, *shape), generator=g, device=dev) for g in gens]) * std
    rician = to_device([p["noise"] == "rician" for p in params], dev).view(b, 1, *sp)
    image = torch.where(rician, ((image + n1) ** 2 + n2**2).sqrt(), image + n1)
    image = _normalise(image)
    inverted = to_device([p["inverted"] for p in params], dev).view(b, 1, *sp)
    return torch.where(inverted, 1.0 - image, image)


def synth_batch(config: SynthConfig, seed: int, indices: Sequence[int], device: torch.device | str = "cpu",
                meta: bool = False) -> dict:
    """``{"image": (B, 1, *shape) in [0, 1], "mask": (B, 1, *shape) int64}`` for sample ``indices``, made on
    ``device``; the same sample for the same ``(seed, index)`` whichever batch it is in. ``meta=True`` adds
    each sample's label-map kind and appearance parameters."""
    device = torch.device(device)
    indices = [int(i) for i in indices]
    label, kinds = label_maps(config, seed, indices, device)
    r = dict(RANGES, **(config.ranges or {}))
    params = [_draw_appearance(np.random.default_rng([int(seed), i, _PARAM_STREAM + 1]), config.n_labels,
                               config.spatial_dims, r) for i in indices]
    gens = [_device_generator(seed, i, device, _DEVICE_STREAM + 1) for i in indices]  # appearance fields
    out = {"image": render_batch(label, config.n_labels, params, gens), "mask": label[:, None]}
    if meta:
        out["meta"] = [{"seed": int(seed), "index": i, "label_kind": k, "appearance": p}
                       for i, k, p in zip(indices, kinds, params)]
    return out
