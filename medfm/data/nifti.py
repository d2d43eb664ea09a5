"""NIfTI reader (nibabel): .nii / .nii.gz, 3D volumes or 4D multi-channel volumes."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np

from .errors import DataError


MAX_VOXELS = 2**31  # a header claiming more voxels than this is damaged, not a scan


def open_nifti(path: str | os.PathLike):
    """The nibabel image of ``path`` with its header read and its claimed size checked (no voxel data read):
    a damaged header claiming an enormous volume is a DataError before anything tries to allocate it."""
    img = nib.load(str(path))
    if math.prod(img.shape) > MAX_VOXELS:
        raise DataError(f"{path}: the NIfTI header claims a {img.shape} volume ({math.prod(img.shape):,} voxels): "
                        "damaged header")
    return img


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Return a channel-first float32 array (C, X, Y[, Z]) and the RAS affine of the file.

    A 4D file's last axis becomes channels (e.g. MRI sequences or time points).
    """
    try:
        img = open_nifti(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except Exception as e:  # nibabel raises many kinds on truncated/corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
    if data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    elif data.ndim in (2, 3):
        data = data[None]
    else:
        raise DataError(f"{path}: NIfTI with {data.ndim} dimensions {data.shape}; expected 2, 3 or 4")
    return data, np.asarray(img.affine, dtype=np.float64)
