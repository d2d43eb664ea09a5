"""``load(path)``: one file or one DICOM folder -> one sample dict (``image``, ``meta``; the keys every medfm dataset uses)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .dicom import is_dicom_file, read_dicom_file, read_dicom_series
from .errors import DataError, MissingFileError
from .image2d import SUFFIXES as IMAGE_SUFFIXES
from .image2d import read_image2d
from .nifti import read_nifti
from .volume import make_sample, pixel_affine_2d


def _to_dims(array: np.ndarray, dims: int, want: int | None, path) -> tuple[np.ndarray, int]:
    """Check the array has the asked number of spatial dims; squeeze a singleton 3rd axis for 2D."""
    if want is None or want == dims:
        return array, dims
    if want == 3 and dims == 2:
        raise DataError(f"{path}: is a 2D image {tuple(array.shape[1:])}, but a 3D volume was asked")
    if want == 2 and dims == 3:
        singleton = [i for i, s in enumerate(array.shape[1:]) if s == 1]
        if not singleton:
            raise DataError(f"{path}: is a 3D volume {tuple(array.shape[1:])}, but a 2D image was asked")
        return np.squeeze(array, axis=1 + singleton[0]), 2
    raise DataError(f"{path}: spatial_dims must be 2 or 3, got {want}")


def load(
    path: str | os.PathLike,
    spatial_dims: int | None = None,
    allow_constant: bool = False,
    series_uid: str | None = None,
) -> dict:
    """Read one image, volume or DICOM series into ``{"image", "meta"}``.

    ``image`` is a float32 channel-first tensor (a MONAI ``MetaTensor`` carrying
    the affine, so MONAI spatial transforms work on it): (C, H, W) for 2D files,
    (C, X, Y, Z) for volumes in the file's voxel order. ``meta`` holds ``path``,
    ``spatial_dims``, ``spacing``, the 4x4 RAS ``affine`` and ``orientation``.

    Readers: NIfTI (.nii, .nii.gz), DICOM (a file, a multi-frame file, or a folder
    holding one series), PNG/JPEG/BMP/TIFF. ``spatial_dims`` asks for 2D or 3D and
    makes a mismatch an error. NaN/inf and constant images are errors (pass
    ``allow_constant=True`` for label masks), each naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{path}: no such file or folder")
    name = p.name.lower()
    if p.is_dir():
        array, affine = read_dicom_series(p, series_uid=series_uid)
        dims = 3
    elif name.endswith((".nii", ".nii.gz")):
        array, affine = read_nifti(p)
        dims = array.ndim - 1
    elif name.endswith(IMAGE_SUFFIXES):
        array, affine, dims = read_image2d(p), pixel_affine_2d(), 2
    elif name.endswith(".npz"):
        raise DataError(f"{path}: an .npz holds many samples; use medfm.data.NpzDataset or read_npz")
    elif name.endswith(".dcm") or is_dicom_file(p):
        array, affine, dims = read_dicom_file(p)
    else:
        raise DataError(f"{path}: unknown file type (expected .nii/.nii.gz, DICOM, PNG/JPEG/BMP/TIFF, or a DICOM folder)")
    array, dims = _to_dims(array, dims, spatial_dims, path)
    return make_sample(array, affine, p, dims, allow_constant=allow_constant)


def load_mask(path: str | os.PathLike, spatial_dims: int | None = None) -> dict:
    """A label map (:func:`load` with constant images allowed). An 8-bit image file whose values are only 0 and 255
    is a binary mask saved for viewing (BUSI, BUS-BRA, ISIC and most 2D sets store theirs so): read as 0 / 1, so it
    is the one foreground class it holds, not label 255 of 256."""
    sample = load(path, spatial_dims=spatial_dims, allow_constant=True)
    if str(path).lower().endswith(IMAGE_SUFFIXES):
        values = np.unique(np.asarray(sample["image"]))
        if values.max(initial=0) == 255 and set(values.tolist()) <= {0.0, 255.0}:
            sample["image"] = sample["image"] / 255
            sample["meta"]["binary_255"] = True
    return sample
