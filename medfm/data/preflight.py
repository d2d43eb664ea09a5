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


def cross_split_copies(path: str | os.PathLike, splits: list[str], limit: int = 5) -> list[str]:
    """Images stored twice with identical content in two of ``splits`` (a held-out copy of a training image):
    an npz's rows compared by a hash of their bytes; a manifest's files compared by size first and hashed only
    where two sizes in different splits agree. Returns up to ``limit`` descriptions (empty when clean): a cheap
    check a run makes before training (``medfm curate`` finds near-duplicates too)."""
    import hashlib

    import numpy as np

    from .manifest import read_rows
    from .npz import read_npz

    p = str(path)
    seen: dict[str, str] = {}
    found: list[str] = []

    def note(key: str, where: str, split: str) -> None:
        if key in seen and not seen[key].startswith(f"{split} "):
            found.append(f"{where} = {seen[key]}")
        seen.setdefault(key, where)

    if p.lower().endswith(".npz"):
        for split in splits:
            images = read_npz(p, split)[0]
            for i, image in enumerate(np.asarray(images)):
                note(hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest(), f"{split} sample {i}", split)
        return found[:limit]
    if not p.lower().endswith((".csv", ".tsv", ".jsonl")):
        return []
    root = Path(p).parent
    files: dict[int, list[tuple[str, str, int]]] = {}
    for line, row in read_rows(p):
        split, image = str(row.get("split", "")), str(row.get("image") or "")
        if split in splits and image:
            f = Path(image) if Path(image).is_absolute() else root / image
            if f.is_file():
                files.setdefault(f.stat().st_size, []).append((split, str(f), line))
    for group in files.values():
        if len({s for s, _, _ in group}) < 2 or len({f for _, f, _ in group}) < 2:
            continue  # one split, or one file listed twice (the manifest reader warns about that)
        for split, f, line in group:
            note(hashlib.sha1(Path(f).read_bytes()).hexdigest(), f"{split} line {line} ({Path(f).name})", split)
    return found[:limit]
