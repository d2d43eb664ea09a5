"""Helpers shared by the readers: affine -> spacing/orientation, sanity checks, the sample dict."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from .errors import DataError


def plain_tensor(x) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor``: MONAI transforms return MetaTensors, which batch, pickle and
    optimise slower and drag their metadata into every result."""
    return torch.as_tensor(x).as_subclass(torch.Tensor)


def describe_affine(affine: np.ndarray, spatial_dims: int) -> tuple[tuple[float, ...], str | None]:
    """Voxel spacing (norm of each axis column) and, for 3D, orientation codes such as ``"RAS"``."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :spatial_dims], axis=0))
    orientation = "".join(nib.aff2axcodes(affine)) if spatial_dims == 3 else None
    return spacing, orientation


def geometry_meta(affine: np.ndarray, spatial_dims: int) -> dict:
    """``affine``, ``spacing`` and, for 3D, ``orientation`` entries of a sample's ``meta``.

    ``orientation`` is absent in 2D (not None), so that torch's default collation works.
    """
    spacing, orientation = describe_affine(affine, spatial_dims)
    meta = {"affine": np.asarray(affine, dtype=np.float64), "spacing": spacing}
    if orientation is not None:
        meta["orientation"] = orientation
    return meta


def check_array(array: np.ndarray, path: str | os.PathLike, allow_constant: bool = False) -> None:
    """Reject empty, non-finite and (for images) constant arrays, naming the file."""
    if array.size == 0:
        raise DataError(f"{path}: the image is empty (shape {array.shape})")
    finite = np.isfinite(array)
    if not finite.all():
        n = int((~finite).sum())
        raise DataError(f"{path}: {n} of {array.size} values are NaN or infinite")
    if not allow_constant and array.min() == array.max():
        raise DataError(f"{path}: the image is constant (every value is {array.flat[0]!r}); nothing to learn from")


def make_sample(
    array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, spatial_dims: int, allow_constant: bool = False
) -> dict:
    """Build ``{"image": MetaTensor (C, *spatial), "meta": {...}}`` from a channel-first array."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    check_array(array, path, allow_constant)
    affine = np.asarray(affine, dtype=np.float64)
    image = MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(affine))
    meta = {"path": str(path), "spatial_dims": spatial_dims, **geometry_meta(affine, spatial_dims)}
    return {"image": image, "meta": meta}


def pixel_affine_2d(row_spacing: float = 1.0, col_spacing: float = 1.0) -> np.ndarray:
    """4x4 affine of a 2D (rows, columns) image: axis 0 along rows, axis 1 along columns."""
    return np.diag([row_spacing, col_spacing, 1.0, 1.0])
