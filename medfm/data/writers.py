"""Writers for what medfm produces as files (synthetic and generated sets): NIfTI and PNG, atomically.

Files are byte-identical for the same array (gzip without a timestamp), so a generated set can be
checked by hash, and a kill never leaves half a file under a finished name.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from medfm.atomic import atomic_path


def write_nifti(array: np.ndarray, path: str | os.PathLike, affine: np.ndarray | None = None) -> Path:
    """gzip'd NIfTI-1 (default: 1 mm identity affine), written to a temp file and renamed."""
    img = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """A 2D image with values in [0, 1] ((H, W) or (1, H, W)) as an 8-bit grayscale PNG."""
    arr = np.asarray(image, dtype=np.float32)
    arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
    if arr.ndim != 2:
        raise ValueError(f"{path}: write_png takes one grayscale 2D image, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")  # (rows, columns)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def write_manifest(path: str | os.PathLike, rows: list[dict]) -> Path:
    """A CSV manifest (the columns of the first row) written atomically: a set's index file is complete or absent."""
    import csv

    from medfm.atomic import write_text

    if not rows:
        raise ValueError(f"{path}: a manifest needs at least one row")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    return Path(path)
