"""Pre-flight: read every file's header before a run starts, so a corrupt file is reported in the first
seconds with its manifest line, not when it is first drawn hours into training.

Header reads only (NIfTI header and its claimed size, DICOM tags with the pixel data located but not read, image format
verification): a few milliseconds per file. Manifests of at most :data:`AUTO_LIMIT` rows are checked by
default (``preflight: auto``); larger ones when asked (``preflight: true``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

AUTO_LIMIT = 5000  # rows: above this, `auto` skips the scan (ask for it with preflight: true)
MAX_VOXELS = 2**31  # a header claiming more voxels than this is damaged, not a scan
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def header_problem(path: str | os.PathLike) -> str | None:
    """Why the file (or DICOM folder) at ``path`` cannot be read, from its header; None when it looks fine."""
    p = Path(path)
    try:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            return "empty folder" if not files else header_problem(files[0])
        if p.stat().st_size == 0:
            return "empty file (0 bytes)"
        name = p.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = nib.load(str(p)).shape
            if math.prod(shape) > MAX_VOXELS:
                return f"the NIfTI header claims a {shape} volume ({math.prod(shape):,} voxels): damaged header"
        elif name.endswith(IMAGE_SUFFIXES):
            from PIL import Image

            with Image.open(p) as im:
                im.verify()
        elif name.endswith(".npz"):
            return None
        else:  # DICOM (any extension or none)
            import pydicom

            ds = pydicom.dcmread(str(p), defer_size=1024)  # large values (the pixels) are not read, only located
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                return "a DICOM file without pixel data"
    except Exception as e:  # noqa: BLE001 - any reader failure is the answer
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
    return None
