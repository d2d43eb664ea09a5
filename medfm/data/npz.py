"""MedMNIST-style ``.npz`` archives: ``{split}_images`` / ``{split}_labels`` arrays, 2D or 3D."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from .errors import DataError, MissingFileError


def npz_splits(path: str | os.PathLike) -> list[str]:
    """Splits present in the archive: one per ``{split}_images`` array (MedMNIST key names)."""
    keys = _keys(path)
    return sorted(k[: -len("_images")] for k in keys if k.endswith("_images"))


def _keys(path) -> list[str]:
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e


def read_npz(
    path: str | os.PathLike, split: str = "train", spatial_dims: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Return (images (N, C, *spatial) uint8/float, labels (N, K) or None, spatial_dims) of one split.

    Shapes follow MedMNIST: (N, H, W) grayscale 2D, (N, H, W, 3) colour 2D,
    (N, D, H, W) grayscale 3D. Pass ``spatial_dims`` when a shape is ambiguous.
    A split the archive lacks is an error that names the file and the splits it has.
    """
    splits = npz_splits(path)
    if split not in splits:
        raise DataError(
            f"{path}: no {split!r} split (no '{split}_images' array); splits in this file: {', '.join(splits) or 'none'}"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z[f"{split}_images"]
            labels = z[f"{split}_labels"] if f"{split}_labels" in z.files else None
    except Exception as e:
        raise DataError(f"{path}: cannot read split {split!r} ({type(e).__name__}: {e})") from e
    if len(images) == 0:
        raise DataError(f"{path}: split {split!r} is empty (0 images)")
    if images.ndim == 3:
        dims, images = 2, images[:, None]
    elif images.ndim == 4 and images.shape[-1] == 3 and spatial_dims != 3:
        dims, images = 2, np.moveaxis(images, -1, 1)
    elif images.ndim == 4:
        dims, images = 3, images[:, None]
    else:
        raise DataError(f"{path}: '{split}_images' has shape {images.shape}; expected (N,H,W), (N,H,W,3) or (N,D,H,W)")
    if spatial_dims is not None and dims != spatial_dims:
        raise DataError(f"{path}: '{split}' holds {dims}D images, but {spatial_dims}D was asked")
    if labels is not None:
        labels = labels.reshape(len(labels), -1)
        if len(labels) != len(images):
            raise DataError(f"{path}: {len(images)} '{split}' images but {len(labels)} labels")
    return images, labels, dims
