"""A persistent on-disk cache of the deterministic preprocessing of each sample (``data.cache: disk``).

Reading a NIfTI volume, reorienting and resampling it to the recipe's spacing takes most of a 3D loader's
time and gives the same result every epoch and every run; MONAI's ``PersistentDataset`` idea, kept inside
medfm's datasets so their error messages, ``on_error`` and step-keyed sampling stay as they are. One file per
sample, named by a hash of what it was made from: the sample's source files (path, size, modification
time), its place in the dataset and the preprocessing's ``fingerprint`` (the recipe's preset, its arguments
and size). A changed file or preset is a new key, never a stale hit. Files are written atomically and read
with ``torch.load(weights_only=True)``: tensors, numbers, strings and lists only (MetaTensors are stored
as tensor + affine and rebuilt), so nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from medfm.atomic import atomic_path

DEFAULT_DIR = Path(os.environ.get("MEDFM_CACHE", Path.home() / ".cache" / "medfm")) / "preprocessed"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


class DiskCache:
    """``get(key)`` / ``put(key, sample)`` of preprocessed sample dicts in ``folder``; ``key(...)`` builds keys."""

    def __init__(self, folder: str | os.PathLike | None = None, fingerprint: str = ""):
        self.folder = Path(folder) if folder else DEFAULT_DIR
        self.fingerprint = fingerprint
        self.hits = self.misses = 0

    def key(self, where: str, files: Sequence[str | os.PathLike]) -> str:
        """The cache key of one sample: ``where`` (its dataset and row) and the identity of its ``files``."""
        stats = []
        for f in files:
            st = os.stat(f)
            stats.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        blob = json.dumps([where, stats, self.fingerprint], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file (disk full, foreign file): recompute and overwrite it
            self.misses += 1
            return None
        self.hits += 1
        sample = {k: MetaTensor(v, affine=stored["affine"][k]) if k in stored["affine"] else v
                  for k, v in stored["tensors"].items()}
        sample.update(json.loads(stored["rest"]))
        return sample

    def put(self, key: str, sample: dict) -> None:
        tensors, affine, rest = {}, {}, {}
        for k, v in sample.items():
            if isinstance(v, MetaTensor):
                tensors[k], affine[k] = v.as_tensor().contiguous(), torch.as_tensor(v.affine)
            elif torch.is_tensor(v):
                tensors[k] = v.contiguous()
            else:
                rest[k] = _jsonable(v)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"tensors": tensors, "affine": affine, "rest": json.dumps(rest)}, tmp)


CACHE_CHOICES = "true (in memory), false, or disk (a persistent cache in data.cache_dir)"


def dataset_cache(value, folder: str | os.PathLike | None = None, fingerprint: dict | None = None) -> bool | DiskCache:
    """A recipe's ``data.cache`` as a dataset's ``cache`` argument: ``true``/``memory`` (per process, this run),
    ``false``, or ``disk`` (:class:`DiskCache` in ``data.cache_dir``, default ``$MEDFM_CACHE/preprocessed`` or
    ``~/.cache/medfm/preprocessed``, keyed by ``fingerprint``: what the deterministic preprocessing depends on)."""
    if value in (True, "memory"):
        return True
    if value in (False, None, "none"):
        return False
    if value == "disk":
        return DiskCache(folder, json.dumps(fingerprint or {}, sort_keys=True, default=str))
    raise ValueError(f"data.cache must be {CACHE_CHOICES}; got {value!r}")
