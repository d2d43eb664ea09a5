"""Random appearance: turn a label map into an image with random contrast, as scanners of every kind would; and
the same changes as an augmentation of real images (:class:`RandAppearanced`).

Every parameter is drawn from :data:`RANGES` (documented, tested) with the
caller's ``numpy.random.Generator`` and returned, so a sample's ``meta`` says
exactly how it was made. Smoothing and contrast use MONAI's transforms
(``GaussianSmooth``, ``AdjustContrast``) with the drawn parameters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import AdjustContrast, GaussianSmooth, MapTransform, RandomizableTransform

from .labels import smooth_fields

# name: (low, high) of the uniform draw, or a probability
RANGES: dict[str, tuple[float, float] | float] = {
    "mean": (0.0, 1.0),  # per-label mean intensity (Gaussian mixture means)
    "std": (0.0, 0.08),  # per-label intensity std (texture)
    "partial_volume_sigma": (0.0, 1.0),  # voxels: label boundaries blurred before rendering
    "bias": (0.0, 0.4),  # bias field strength: multiplicative exp(bias * smooth field)
    "gamma": (0.6, 1.6),  # contrast change (power law)
    "blur_sigma": (0.0, 1.0),  # voxels: scanner point-spread
    "lowres_prob": 0.3,  # probability of simulated thick slices
    "lowres_factor": (1.5, 4.0),  # slice thickness factor along one random axis
    "noise_std": (0.0, 0.05),  # Gaussian or Rician noise std (image range is [0, 1])
    "rician_prob": 0.5,  # Rician (magnitude MR) rather than Gaussian noise
    "invert_prob": 0.2,  # "modality flip": inverted contrast
}


def _u(rng: np.random.Generator, key: str, ranges: dict, size=None):
    lo, hi = ranges[key]
    return rng.uniform(lo, hi, size)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def render(label: torch.Tensor, n_labels: int, rng: np.random.Generator, ranges: dict | None = None) -> tuple[torch.Tensor, dict]:
    """An image (1, *shape) in [0, 1] for a label map (*shape), and the parameters drawn."""
    r = dict(RANGES, **(ranges or {}))
    dims = label.ndim
    shape = tuple(label.shape)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    p: dict = {}

    means = torch.from_numpy(_u(rng, "mean", r, n_labels).astype(np.float32))
    stds = torch.from_numpy(_u(rng, "std", r, n_labels).astype(np.float32))
    p["mean"], p["std"] = means.tolist(), stds.tolist()

    # partial volume: soft label weights from a blurred one-hot
    weights = F.one_hot(label, n_labels).movedim(-1, 0).float()
    p["partial_volume_sigma"] = float(_u(rng, "partial_volume_sigma", r))
    if p["partial_volume_sigma"] > 0.05:
        weights = GaussianSmooth(sigma=p["partial_volume_sigma"])(weights)
    view = (-1,) + (1,) * dims
    image = (weights * means.view(view)).sum(0) + (weights * stds.view(view)).sum(0) * torch.randn(shape, generator=gen)

    # bias field
    p["bias"] = float(_u(rng, "bias", r))
    image = image * torch.exp(p["bias"] * smooth_fields(shape, 1, min(shape) / 3, rng)[0])
    image = _normalise(image)[None]

    p["gamma"] = float(_u(rng, "gamma", r))
    image = AdjustContrast(gamma=p["gamma"])(image)

    p["blur_sigma"] = float(_u(rng, "blur_sigma", r))
    if p["blur_sigma"] > 0.05:
        image = GaussianSmooth(sigma=p["blur_sigma"])(image)

    # simulated anisotropic resolution: thick slices along one axis, back to the grid
    p["lowres_axis"], p["lowres_factor"] = None, 1.0
    if rng.random() < r["lowres_prob"]:
        axis = int(rng.integers(dims))
        factor = float(_u(rng, "lowres_factor", r))
        small = list(shape)
        small[axis] = max(1, int(math.ceil(shape[axis] / factor)))
        mode = "bilinear" if dims == 2 else "trilinear"
        image = F.interpolate(F.interpolate(image[None], size=tuple(small), mode="area"), size=shape, mode=mode)[0]
        p["lowres_axis"], p["lowres_factor"] = axis, factor

    p["noise_std"] = float(_u(rng, "noise_std", r))
    p["noise"] = "rician" if rng.random() < r["rician_prob"] else "gaussian"
    n1 = torch.randn(image.shape, generator=gen) * p["noise_std"]
    if p["noise"] == "rician":
        n2 = torch.randn(image.shape, generator=gen) * p["noise_std"]
        image = ((image + n1) ** 2 + n2**2).sqrt()
    else:
        image = image + n1

    p["inverted"] = bool(rng.random() < r["invert_prob"])
    image = _normalise(torch.as_tensor(image))
    if p["inverted"]:
        image = 1.0 - image
    return image.float(), p


class RandAppearanced(RandomizableTransform, MapTransform):
    """The engine's random appearance as a data augmentation for real images (``data.appearance`` of a task
    recipe): with probability ``prob`` an image in [0, 1] gets a bias field, a gamma change, Gaussian or Rician
    noise and, with :data:`RANGES` ``invert_prob``, inverted contrast; every draw from :data:`RANGES`, so a
    model meets the scanner-to-scanner changes the synthetic engine renders. Seeded like every MONAI random
    transform (``set_random_state``), so a run's augmentation depends only on its seed and step."""

    def __init__(self, keys="image", prob: float = 0.8, ranges: dict | None = None):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.ranges = dict(RANGES, **(ranges or {}))

    def appearance(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        r = self.ranges
        shape = tuple(x.shape[1:])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x = _normalise(x.float())
        x = _normalise(x * torch.exp(float(_u(rng, "bias", r)) * smooth_fields(shape, 1, min(shape) / 3, rng)[0]))
        x = x ** float(_u(rng, "gamma", r))
        std = float(_u(rng, "noise_std", r))
        n1 = torch.randn(x.shape, generator=gen) * std
        if rng.random() < r["rician_prob"]:
            x = ((x + n1) ** 2 + (torch.randn(x.shape, generator=gen) * std) ** 2).sqrt()
        else:
            x = x + n1
        x = _normalise(x)
        return 1.0 - x if rng.random() < r["invert_prob"] else x

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return data
        rng = np.random.default_rng(self.R.randint(2**31))
        out = dict(data)
        for key in self.key_iterator(out):
            x = out[key]
            y = self.appearance(torch.as_tensor(x), rng)
            out[key] = y.to(x.dtype) if torch.is_tensor(x) else y.numpy().astype(x.dtype)
        return out
