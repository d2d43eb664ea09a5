"""DICOM reader (pydicom): single images, multi-frame files and whole series in a folder.

Pixel values are converted to physical units (``RescaleSlope``/``RescaleIntercept``,
i.e. Hounsfield units for CT). Volumes are returned in array order (column,
row, slice) with a RAS affine built from ImagePositionPatient,
ImageOrientationPatient and PixelSpacing (DICOM's LPS flipped to RAS, as
nibabel and MONAI do), so they line up with NIfTI volumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SKIP_NAMES = {"DICOMDIR", "LOCKFILE", "VERSION"}


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM preamble marker ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read(path: str | os.PathLike, pixels: bool = True) -> Dataset:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except Exception as e:
        raise DataError(f"{path}: cannot read as DICOM ({type(e).__name__}: {e})") from e


def _pixels(ds: Dataset, path) -> np.ndarray:
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (truncated, or not an image: SOP class {ds.get('SOPClassUID', '?')})")
    try:
        arr = ds.pixel_array.astype(np.float32)
    except Exception as e:
        raise DataError(f"{path}: cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e
    return arr


def _rescale(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if "DoseGridScaling" in ds:  # RT dose grids
        slope *= float(ds.DoseGridScaling)
    arr = arr * slope + intercept
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # bright = low values: invert
        arr = arr.max() + arr.min() - arr
    return arr


def _geometry(ds: Dataset, path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, pixel spacing (row, col), position) of one image."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    orient = ds.get("ImageOrientationPatient")
    spacing = ds.get("PixelSpacing")
    if shared:
        grp = shared[0]
        if orient is None and "PlaneOrientationSequence" in grp:
            orient = grp.PlaneOrientationSequence[0].ImageOrientationPatient
        if spacing is None and "PixelMeasuresSequence" in grp:
            spacing = grp.PixelMeasuresSequence[0].PixelSpacing
    if orient is None or spacing is None:
        raise DataError(f"{path}: DICOM lacks ImageOrientationPatient/PixelSpacing; cannot place it in space")
    orient = np.asarray(orient, dtype=np.float64)
    position = np.asarray(ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]), dtype=np.float64)
    return orient[:3], orient[3:], np.asarray(spacing, dtype=np.float64), position


def _affine(row_dir, col_dir, spacing, origin, slice_step) -> np.ndarray:
    """RAS affine for an array indexed (column i, row j, slice k)."""
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: the column index grows
    lps[:3, 1] = col_dir * spacing[0]  # along a column: the row index grows
    lps[:3, 2] = slice_step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _frame_positions(ds: Dataset, n: int, row_dir, col_dir, position) -> np.ndarray:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and "PlanePositionSequence" in per_frame[0]:
        return np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in per_frame], dtype=np.float64)
    offsets = ds.get("GridFrameOffsetVector")
    if offsets is not None and len(offsets) == n:  # RT dose: offsets along the slice normal
        normal = np.cross(row_dir, col_dir)
        return position + np.asarray(offsets, dtype=np.float64)[:, None] * normal
    step = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
    return position + np.arange(n)[:, None] * step * np.cross(row_dir, col_dir)


def read_dicom_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """One DICOM file: a single image -> (C, rows, cols), 2D; a multi-frame file -> (1, cols, rows, frames), 3D.

    Returns (array, 4x4 affine, spatial_dims).
    """
    ds = _read(path)
    arr = _rescale(_pixels(ds, path), ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rgb = int(ds.get("SamplesPerPixel", 1)) > 1
    if frames == 1:
        if rgb:
            arr = np.moveaxis(arr, -1, 0)
        else:
            arr = arr[None]
        spacing = ds.get("PixelSpacing", ds.get("ImagerPixelSpacing", [1.0, 1.0]))
        return arr, np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0]), 2
    if rgb:
        raise DataError(f"{path}: multi-frame colour DICOM is not supported as a volume")
    row_dir, col_dir, spacing, position = _geometry(ds, path)
    positions = _frame_positions(ds, frames, row_dir, col_dir, position)
    step = (positions[-1] - positions[0]) / max(frames - 1, 1)
    volume = np.transpose(arr, (2, 1, 0))[None]  # (frames, rows, cols) -> (1, cols, rows, frames)
    return volume, _affine(row_dir, col_dir, spacing, positions[0], step), 3


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All slices of one series in ``folder`` -> (1, cols, rows, slices) in HU and a RAS affine.

    Slices are sorted by their position along the slice normal, whatever order the
    files are listed in. Mixed series, orientations or slice sizes are errors that
    name the offending file.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in SKIP_NAMES)
    if not files:
        raise DataError(f"{folder}: the folder holds no DICOM files")
    headers = [(p, _read(p, pixels=False)) for p in files]
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if series_uid is not None:
        headers = [(p, ds) for p, ds in headers if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not headers:
            raise DataError(f"{folder}: no slice of series {series_uid}; series present: {uids}")
    elif len(uids) > 1:
        raise DataError(f"{folder}: holds {len(uids)} series {uids}; pass series_uid= to choose one")
    if len(headers) < 2:
        raise DataError(f"{folder}: holds one slice ({headers[0][0].name}); a 3D volume needs at least two")
    ref_path, ref = headers[0]
    row_dir, col_dir, spacing, _ = _geometry(ref, ref_path)
    normal = np.cross(row_dir, col_dir)
    entries = []
    for p, ds in headers:
        r, c, s, pos = _geometry(ds, p)
        if not (np.allclose(r, row_dir, atol=1e-3) and np.allclose(c, col_dir, atol=1e-3)):
            raise DataError(f"{p}: slice orientation {list(np.r_[r, c])} differs from {ref_path.name}'s; not one volume")
        if (ds.Rows, ds.Columns) != (ref.Rows, ref.Columns) or not np.allclose(s, spacing):
            raise DataError(f"{p}: slice size or pixel spacing differs from {ref_path.name}'s")
        entries.append((float(pos @ normal), pos, p))
    entries.sort(key=lambda e: e[0])
    depths = np.array([e[0] for e in entries])
    gaps = np.diff(depths)
    if np.any(gaps < 1e-4):
        dup = [entries[i][2].name for i in np.nonzero(gaps < 1e-4)[0]]
        raise DataError(f"{folder}: two slices share one position ({dup[0]} and its neighbour); duplicate files?")
    if gaps.max() - gaps.min() > 0.05 * np.median(gaps) + 1e-3:
        raise DataError(f"{folder}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm); missing slices?")
    slices = []
    for _, _, p in entries:
        ds = _read(p)
        slices.append(_rescale(_pixels(ds, p), ds))
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)[None]  # (rows, cols, k) -> (1, cols, rows, k)
    step = (entries[-1][1] - entries[0][1]) / (len(entries) - 1)
    return volume, _affine(row_dir, col_dir, spacing, entries[0][1], step)
