"""Datasets of sample dicts: from a CSV/JSONL manifest, or from a MedMNIST ``.npz``.

Both share :class:`SampleDataset`: MONAI dict transforms applied to each
sample, an optional cache of the deterministic part of the transforms (everything before the first random
transform: in memory, or on disk across runs and workers with :class:`~medfm.data.cache.DiskCache`), and ``on_error``:
``"raise"`` stops at the first bad sample with a message naming the file and
manifest row; ``"skip"`` drops it, counts it in ``skipped`` and warns.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Randomizable
from torch.utils.data import ConcatDataset, Dataset, default_collate

from .cache import DiskCache
from .errors import DataError
from .io import load, load_mask
from .manifest import ManifestRecord, read_records, read_rows
from .npz import npz_splits, read_npz
from .preflight import AUTO_LIMIT, header_problem
from .volume import geometry_meta, make_sample


def _split_transform(transform: Callable | Sequence[Callable] | None) -> tuple[Callable | None, Callable | None]:
    """(deterministic prefix, rest): the prefix ends before the first random transform."""
    if transform is None:
        return None, None
    items = list(transform.transforms) if isinstance(transform, Compose) else (
        list(transform) if isinstance(transform, (list, tuple)) else [transform]
    )
    k = next((i for i, t in enumerate(items) if isinstance(t, Randomizable)), len(items))
    return (Compose(items[:k]) if k else None), (Compose(items[k:]) if k < len(items) else None)


def finalise_sample(sample: dict) -> dict:
    """MetaTensor -> plain tensor; ``meta`` updated to the affine/spacing the transforms produced."""
    image = sample["image"]
    meta = dict(sample.get("meta", {}))
    if isinstance(image, MetaTensor):
        meta.update(geometry_meta(image.affine.numpy(), image.ndim - 1))
        sample["image"] = image.as_tensor()
    if isinstance(sample.get("mask"), MetaTensor):
        sample["mask"] = sample["mask"].as_tensor()
    sample["meta"] = meta
    return sample


def collate(batch: list[dict]) -> dict:
    """Batch sample dicts: tensors and labels stacked, ``text`` a list of str, ``meta`` a list of dicts.

    Use it as ``DataLoader(..., collate_fn=collate)`` when manifest rows carry
    extra columns of mixed types; torch's default collation also works otherwise.
    """
    out = default_collate([{k: v for k, v in s.items() if k not in ("meta", "text")} for s in batch])
    if "text" in batch[0]:
        out["text"] = [s["text"] for s in batch]
    out["meta"] = [s.get("meta", {}) for s in batch]
    return out


def _files(path: str | os.PathLike) -> list[str]:
    """A file, or the files of a DICOM series folder."""
    p = Path(path)
    return sorted(str(f) for f in p.iterdir() if f.is_file()) if p.is_dir() else [str(p)]


class SampleDataset(Dataset):
    """Base: subclasses implement ``__len__``, ``load_sample(i)`` and ``describe(i)`` (for errors)."""

    def __init__(self, transform=None, cache: bool | DiskCache = False, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not isinstance(cache, (bool, DiskCache)):
            raise ValueError(f"cache must be True, False or a DiskCache (a recipe's data.cache: see "
                             f"medfm.data.cache.dataset_cache), got {cache!r}")
        self.pre, self.post = _split_transform(transform)
        self.disk = cache if isinstance(cache, DiskCache) else None
        self.cache = {} if cache is True else None
        self.on_error = on_error
        self.skipped: list[tuple[str, str]] = []  # (which sample, why)

    def load_sample(self, i: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def source_files(self, i: int) -> list[str]:  # pragma: no cover - abstract
        """The files sample ``i`` is read from (their identity keys the disk cache)."""
        raise NotImplementedError

    def _prepared(self, i: int) -> dict:
        if self.cache is not None and i in self.cache:
            return dict(self.cache[i])
        key = self.disk.key(self.describe(i), self.source_files(i)) if self.disk is not None else None
        sample = self.disk.get(key) if key else None
        if sample is None:
            sample = self.load_sample(i)
            if self.pre is not None:
                sample = self.pre(sample)
            if key:
                self.disk.put(key, sample)
        if self.cache is not None:
            self.cache[i] = sample
            sample = dict(sample)
        return sample

    def _get(self, i: int) -> dict:
        try:
            sample = self._prepared(i)
            if self.post is not None:
                sample = self.post(sample)
            return finalise_sample(sample)
        except DataError as e:
            raise DataError(f"{self.describe(i)}: {e}") from e
        except RuntimeError as e:  # MONAI's Compose wraps a transform's DataError ("applying transform ...")
            cause = e.__cause__
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise DataError(f"{self.describe(i)}: {cause}") from e

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                return self._get(j)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                self.skipped.append((self.describe(j), str(e)))
                warnings.warn(f"skipped bad sample ({len(self.skipped)} so far): {e}", stacklevel=2)
        raise DataError(f"every sample of this dataset is bad; first: {self.skipped[0][1] if self.skipped else '?'}")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


class ManifestDataset(SampleDataset):
    """Rows of a CSV or JSONL manifest -> sample dicts.

    Each row names an ``image`` (a file or a DICOM folder; relative paths resolve
    against the manifest's folder) and optionally labels, a ``mask`` and a report
    ``text``. See :func:`medfm.data.manifest.read_records` for how labels are encoded.
    Rows with a missing file or an unknown label are errors (or, with
    ``on_error="skip"``, dropped and counted before training starts).
    """

    def __init__(self, manifest: str | os.PathLike, split: str | None = None, spatial_dims: int | None = None,
                 transform=None, cache: bool | DiskCache = False, on_error: str = "raise", preflight: bool | str = False,
                 **columns: Any):
        """``columns``: which manifest columns hold what (``image_key``, ``label_keys``, ``classes``,
        ``multi_label``, ``mask_key``, ``text_key``, ``split_key``, ``images_repeat``), as
        :func:`medfm.data.manifest.read_records` takes them."""
        super().__init__(transform=transform, cache=cache, on_error=on_error)
        self.manifest = str(manifest)
        self.spatial_dims = spatial_dims
        records, self.classes, bad = read_records(manifest, split=split, on_error=on_error, **columns)
        self.records: list[ManifestRecord] = records
        if preflight is True or (preflight == "auto" and len(records) <= AUTO_LIMIT):
            bad += self._preflight()
        self.skipped.extend(bad)
        if bad:
            warnings.warn(f"{self.manifest}: skipped {len(bad)} bad row(s), e.g. {bad[0][1]}", stacklevel=2)

    def _preflight(self) -> list[tuple[str, str]]:
        """Read the header of every image and mask file (``medfm.data.preflight``); a bad one is an error naming
        its line (``on_error="raise"``) or its row is dropped (``"skip"``). Returns the dropped rows."""
        bad, keep = [], []
        for i, rec in enumerate(self.records):
            why = next((f"{f}: {w}" for f in (rec.image, rec.mask) if f and (w := header_problem(f))), None)
            if why is None:
                keep.append(rec)
                continue
            where = f"{self.manifest} line {rec.line}"
            if self.on_error == "raise":
                n = 1 + sum(1 for r in self.records[i + 1:] if any(f and header_problem(f) for f in (r.image, r.mask)))
                raise DataError(f"{where}: {why}" + (f" ({n} bad rows in all; on_error: skip drops them)" if n > 1 else ""))
            bad.append((where, why))
        self.records = keep
        return bad

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, i: int) -> str:
        return f"{self.manifest} line {self.records[i].line}"

    def source_files(self, i: int) -> list[str]:
        rec = self.records[i]
        return [self.manifest, *_files(rec.image), *(_files(rec.mask) if rec.mask else [])]

    def load_sample(self, i: int) -> dict:
        rec = self.records[i]
        sample = load(rec.image, spatial_dims=self.spatial_dims)
        if rec.mask is not None:
            sample["mask"] = load_mask(rec.mask, spatial_dims=sample["meta"]["spatial_dims"])["image"]
            sample["meta"]["mask_path"] = rec.mask
        if rec.label is not None:
            sample["label"] = rec.label
        if rec.text is not None:
            sample["text"] = rec.text
        sample["meta"].update(row=rec.line, **rec.extra)
        return sample


class NpzDataset(SampleDataset):
    """One split of a MedMNIST-style ``.npz`` as sample dicts (image float32 with the file's 0-255 values).

    ``label`` is an int for single-label sets, a float multi-hot vector for
    multi-label ones (MedMNIST stores those as (N, K) with K > 1).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", spatial_dims: int | None = None,
                 transform=None, cache: bool | DiskCache = False, on_error: str = "raise"):
        super().__init__(transform=transform, cache=cache, on_error=on_error)
        self.path = str(path)
        self.split = split
        self.images, self.labels, self.spatial_dims = read_npz(path, split, spatial_dims)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return f"{self.path} [{self.split}] sample {i}"

    def source_files(self, i: int) -> list[str]:
        return [self.path]

    def load_sample(self, i: int) -> dict:
        affine = np.eye(4)
        sample = make_sample(self.images[i], affine, self.path, self.spatial_dims, allow_constant=False)
        sample["meta"].update(row=i, split=self.split)
        if self.labels is not None:
            lab = self.labels[i]
            sample["label"] = int(lab[0]) if lab.shape[0] == 1 else torch.as_tensor(lab, dtype=torch.float32)
        return sample

    @property
    def targets(self) -> np.ndarray | None:
        """All labels of the split, (N,) for single-label sets, (N, K) for multi-label ones."""
        if self.labels is None:
            return None
        return self.labels[:, 0] if self.labels.shape[1] == 1 else self.labels


class FolderDataset(SampleDataset):
    """Every image or volume under a folder (recursively), unlabelled, in sorted order.

    Files: NIfTI, PNG/JPEG/BMP/TIFF, single DICOM files. A folder whose files are
    all ``.dcm`` and that holds more than one of them is read as one DICOM series.
    """

    SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

    def __init__(self, root: str | os.PathLike, spatial_dims: int | None = None, transform=None,
                 cache: bool | DiskCache = False, on_error: str = "raise"):
        super().__init__(transform=transform, cache=cache, on_error=on_error)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{root}: not a folder")
        self.spatial_dims = spatial_dims
        files, series = [], []
        for folder, _, names in os.walk(self.root):
            dcm = [n for n in names if n.lower().endswith(".dcm")]
            if len(dcm) > 1 and len(dcm) == len(names):
                series.append(Path(folder))
                continue
            files += [Path(folder) / n for n in names if n.lower().endswith(self.SUFFIXES + (".dcm",))]
        self.paths = sorted(files + series)
        if not self.paths:
            raise DataError(f"{root}: no images found (looked for {', '.join(self.SUFFIXES)}, .dcm and DICOM series)")

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def source_files(self, i: int) -> list[str]:
        return _files(self.paths[i])

    def load_sample(self, i: int) -> dict:
        sample = load(self.paths[i], spatial_dims=self.spatial_dims)
        sample["meta"]["row"] = i
        return sample


class JoinedDataset(ConcatDataset):
    """Several labelled sample datasets as one training set (a real split plus generated sets). Their class
    names must agree; ``classes`` is theirs (None for npz parts, whose labels are indices)."""

    def __init__(self, parts: Sequence[Dataset]):
        super().__init__(list(parts))
        named = [(getattr(p, "manifest", None) or getattr(p, "path", "?"), getattr(p, "classes", None)) for p in parts]
        named = [(w, [str(c) for c in cs]) for w, cs in named if cs]
        for where, classes in named[1:]:
            if classes != named[0][1]:
                raise DataError(f"{where}: classes {classes} differ from {named[0][0]}'s {named[0][1]}; "
                                "joined training sets must name the same classes in the same order")
        self.classes = named[0][1] if named else None


def split_names(path: str | os.PathLike) -> list[str]:
    """The split names a dataset holds: an npz's ``{split}_images`` arrays, a manifest's ``split`` values, a
    folder's one ``train`` split (so a recipe can check its split names before training)."""
    low = str(path).lower()
    if low.endswith(".npz"):
        return npz_splits(path)
    if low.endswith((".csv", ".tsv", ".jsonl")):
        return sorted({str(r["split"]) for _, r in read_rows(path) if r.get("split") not in (None, "")})
    return ["train"]


def open_dataset(
    path: str | os.PathLike,
    split: str | None = None,
    spatial_dims: int | None = None,
    label: str | Sequence[str] | None = None,
    transform=None,
    cache: bool | DiskCache = False,
    on_error: str = "raise",
    preflight: bool | str = False,
    **manifest_kwargs,
) -> SampleDataset:
    """One dataset from whatever ``path`` is: a MedMNIST ``.npz`` (``split`` names its split),
    a CSV/TSV/JSONL manifest (``split`` filters rows, ``label`` names the label column(s)),
    or a folder of images/volumes (unlabelled; all of it is the ``train`` split). ``preflight`` (manifests:
    True, False or "auto") reads every file's header first (:mod:`medfm.data.preflight`)."""
    p = str(path)
    low = p.lower()
    common = dict(spatial_dims=spatial_dims, transform=transform, cache=cache, on_error=on_error)
    if not os.path.exists(p):
        raise DataError(f"{p}: no such file or folder")
    if low.endswith(".npz"):
        return NpzDataset(p, split=split or "train", **common)
    if low.endswith((".csv", ".tsv", ".jsonl")):
        return ManifestDataset(p, split=split, label_keys=label, preflight=preflight, **manifest_kwargs, **common)
    if os.path.isdir(p):
        if split not in (None, "train"):
            raise DataError(f"{p}: a folder has no splits: all of it is 'train' (asked for {split!r}); "
                            "use a manifest with a split column")
        return FolderDataset(p, **common)
    raise DataError(f"{p}: not a .npz, a .csv/.tsv/.jsonl manifest or a folder")
