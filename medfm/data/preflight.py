"""Pre-flight: read every file's header before a run starts, so a corrupt file is reported in the first
seconds with its manifest line, not when it is first drawn hours into training.

Header reads only (NIfTI header and its claimed size, DICOM tags with the pixel data located but not read, image format
verification): a few milliseconds per file. Manifests of at most :data:`AUTO_LIMIT` rows are checked by
default (``preflight: auto``); larger ones when asked (``preflight: true``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import DataError
from .nifti import open_nifti

AUTO_LIMIT = 5000  # rows: above this, `auto` skips the scan (ask for it with preflight: true)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def header_problem(path: str | os.PathLike) -> str | None:
    """Why the file (or DICOM folder) at ``path`` cannot be read, from its header; None when it looks fine.
    Answers are kept per (path, size, modification time): a run opens its splits several times (training,
    label checks, evaluation) and each file's header is read once, unless the file changes."""
    p = Path(path)
    try:
        stat = p.stat()
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return _header_problem(str(p), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _header_problem(path: str, size: int, mtime_ns: int) -> str | None:
    p = Path(path)
    try:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            return "empty folder" if not files else header_problem(files[0])
        if size == 0:
            return "empty file (0 bytes)"
        name = p.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            try:
                open_nifti(p)
            except DataError as e:  # the damaged-size message names the file; here the row does
                return str(e).removeprefix(f"{p}: ")
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
