"""Atomic writes: a crash or a kill never leaves half a file or half a folder where a finished one is expected.

Files are written as ``NAME.tmp`` beside the target and renamed over it (``os.replace`` is atomic on one
file system); folders (``save_pretrained``) are written as ``NAME.tmp/`` and swapped in.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write; on success it replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder to fill; on success it replaces ``folder`` (the old one is removed)."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """``obj`` as indented JSON (numpy/torch scalars as floats), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float))


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` into ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
