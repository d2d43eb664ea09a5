"""PNG / JPEG / BMP / TIFF reader (Pillow) for 2D images such as radiographs and MedPix figures."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_image2d(path: str | os.PathLike) -> np.ndarray:
    """Return (C, H, W) float32 with the file's own values (0-255 for 8-bit): 1 channel for
    grayscale, 3 for colour (alpha dropped). Scaling belongs to the transforms."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                arr = np.asarray(img, dtype=np.float32)[None]
            else:
                arr = np.moveaxis(np.asarray(img.convert("RGB"), dtype=np.float32), -1, 0)
    except Exception as e:
        raise DataError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from e
    return arr
