"""Atomic file writes: a crash or a kill never leaves half a file where a finished one is expected.

Each writer writes ``NAME.tmp`` beside the target and renames it over the target (``os.replace`` is
atomic on one file system). Folders (``save_pretrained``) go the same way in
:func:`medfm.pretrain.callbacks.save_encoder_atomically`.
"""

from __future__ import annotations

import json
import os
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


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """``obj`` as indented JSON (numpy/torch scalars as floats), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float))
