"""Pretraining mixtures: several image sources in one run, each drawn at its own weight.

Foundation encoders are pretrained on many sources mixed (RAD-DINO: five chest X-ray sets; BiomedCLIP: figures of
many journals), not on one. A recipe's ``data.sources`` names them, each a :class:`MixtureSource`: a manifest, an
npz, a folder or a ``medfm data`` name, its split, its sampling weight, its own preprocessing preset and optionally
the manifest column holding each image's caption or report (for CLIP-style objectives, which then need it on
every source).

Sampling is step-keyed like every medfm run (:mod:`medfm.run.sampling`): sample position ``p`` picks its source
from ``(seed, p)`` with probability proportional to the weights, then an image of that source (drawn with
replacement), so a resumed or multi-rank run draws exactly what the uninterrupted one would.

De-duplication, before training: every image of every source and of the evaluation sets the run must never see
(``data.exclude``: ``{path, split}`` entries; ``data.exclude_suite``: every evaluation split of a suite file,
``default`` for medfm's own) is fingerprinted: exact pixels, a perceptual hash confirmed by pixel correlation (the
checks of ``medfm curate``) and, between sources, a centre-cropped square copy of a full frame
(:mod:`medfm.select.duplicates`). A source image that copies an evaluation image is dropped; an image that copies one of an earlier source is dropped from the later source (PneumoniaMNIST and the
pediatric chest X-rays are the same children's films). What was dropped, and why, is printed and recorded in the
run's ``mixture.json`` with the sources, their weights, sizes and presets.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from medfm.data import DataError, open_dataset
from medfm.data.transforms import PRESETS, with_channels
from medfm.evaluate.suite_spec import data_root, evaluation_splits
from medfm.progress import progress_bar
from medfm.select.duplicates import (
    CROP_CONFIRM,
    CROP_CORRELATION,
    CROP_THUMB,
    HASH_DISTANCE,
    PIXEL_CORRELATION,
    confirm_array,
    crop_confirmed,
    crop_pairs,
    crop_thumbnails,
    exact_key,
    exact_pairs,
    hash_pairs,
    perceptual_hash,
    thumbnail_vector,
)


@dataclass
class MixtureSource:
    """One source of a mixture (an entry of ``data.sources``)."""

    path: str  # a manifest, an npz, a folder, or a `medfm data` name (prepared on first use)
    weight: float = 1.0  # sampling weight (normalised over the sources)
    split: str | None = "train"  # npz split / manifest split value (null: every row)
    preset: str | None = None  # preprocessing preset (default: data.preset)
    preset_args: dict | None = None  # the preset's arguments (default: data.preset_args with data.preset)
    text: str | None = None  # manifest column with each image's caption or report (CLIP-style objectives)
    name: str | None = None  # how tables and mixture.json call it (default: the file's stem or the data name)


@dataclass
class Excluded:
    """An evaluation split a mixture must not train on."""

    path: str
    split: str | None = "val"
    name: str | None = None


def resolve_path(path: str, root: str | None = None) -> str:
    """A path as given (relative ones under ``root``, else ``$MEDFM_SUITE_DATA``, else the working directory), or
    the prepared data of a ``medfm data`` name."""
    base = data_root(root)
    if base is not None and not os.path.isabs(path) and (base / path).exists():
        return str(base / path)
    if os.path.exists(path):
        return path
    from medfm.data import catalogue

    try:
        catalogue.get_source(path)
    except KeyError as e:
        raise DataError(f"data source {path!r}: no such file or folder, and {e.args[0]}") from None
    return str(catalogue.prepare(path, progress=False))


def parse_sources(entries: list, default_preset: str, default_args: dict) -> list[MixtureSource]:
    """``data.sources`` entries (dicts, or bare paths) as sources with their presets filled in."""
    if not isinstance(entries, list) or not entries:
        raise ValueError("data.sources must be a list of sources ({path, weight, split, preset, text}) or null")
    out = []
    for k, e in enumerate(entries):
        e = {"path": e} if isinstance(e, str) else dict(e)
        try:
            s = MixtureSource(**e)
        except TypeError as err:
            raise ValueError(f"data.sources[{k}]: {err} (keys: path, weight, split, preset, preset_args, text, "
                             "name)") from None
        if not (isinstance(s.weight, (int, float)) and s.weight > 0):
            raise ValueError(f"data.sources[{k}] ({s.path}): weight must be a number > 0, got {s.weight!r}")
        if s.preset is None:
            s.preset, s.preset_args = default_preset, dict(default_args) if s.preset_args is None else s.preset_args
        if s.preset not in PRESETS:
            raise ValueError(f"data.sources[{k}] ({s.path}): unknown preset {s.preset!r}; available: "
                             f"{', '.join(PRESETS)}")
        s.preset_args = s.preset_args or {}
        s.name = s.name or (Path(s.path).stem if os.path.exists(s.path) else s.path)
        out.append(s)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources: two sources share a name ({names}); give each a distinct `name`")
    return out


def parse_excluded(entries: list | None, suite: str | None, root: str | None = None) -> list[Excluded]:
    """``data.exclude`` entries plus every evaluation split of the suite file ``suite`` (``default``: medfm's) whose
    data is under ``root``; each (file, split) once."""
    out = []
    for k, e in enumerate(entries or []):
        e = {"path": e} if isinstance(e, str) else dict(e)
        try:
            out.append(Excluded(**e))
        except TypeError as err:
            raise ValueError(f"data.exclude[{k}]: {err} (keys: path, split, name)") from None
    if suite:
        out += [Excluded(path, split, name) for name, path, split in evaluation_splits(suite, root)]
    seen, unique = set(), []
    for e in out:
        key = (str(Path(e.path).resolve()), e.split)
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return unique


@dataclass
class Fingerprints:
    """Exact keys, perceptual hashes and thumbnails of a flat list of images, with who each one is."""

    owner: list[int] = field(default_factory=list)  # -1 - k: exclusion k; s >= 0: source s
    index: list[int] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    small: list[np.ndarray] = field(default_factory=list)  # whole, at the crop thumbnails' size
    crops: list[np.ndarray] = field(default_factory=list)  # central crops (float16: 20 KB an image)
    arrays: list[np.ndarray] = field(default_factory=list)  # uint8, at most 64 px: crop matches confirmed on it

    def add(self, owner: int, dataset, label: str, progress: bool) -> None:
        for i in progress_bar(range(len(dataset)), desc=f"fingerprinting {label}", disable=not progress,
                              unit="image"):
            image = dataset.load_sample(i)["image"]
            self.owner.append(owner)
            self.index.append(i)
            self.where.append(dataset.describe(i))
            self.keys.append(exact_key(image))
            self.hashes.append(perceptual_hash(image))
            self.thumbs.append(thumbnail_vector(image))
            self.small.append(thumbnail_vector(image, CROP_THUMB))
            self.crops.append(crop_thumbnails(image).astype(np.float16))
            self.arrays.append(confirm_array(image))

    def copies(self, chunk: int = 32) -> list[tuple[int, int, bool]]:
        """(i, j, exact), i < j, for every pair of images that are the same picture: the same pixels (exact), a
        perceptual hash within a few bits confirmed by pixel correlation, or (between different owners) a
        centre-cropped copy of a full frame (:func:`medfm.select.duplicates.crop_pairs`)."""
        if not self.keys:
            return []
        exact = set(exact_pairs(self.keys))
        near = {(i, j) for i, j, _ in hash_pairs(self.hashes, thumbnails=np.stack(self.thumbs))}
        owner, wholes, crops = np.asarray(self.owner), np.stack(self.small), np.stack(self.crops)
        for start in range(0, len(crops), chunk):
            block = crops[start:start + chunk].astype(np.float32)
            for a, j, k in crop_pairs(block, wholes):
                i = start + a
                if owner[i] != owner[j] and crop_confirmed(self.arrays[i], k, self.arrays[j]):
                    near.add((min(i, j), max(i, j)))
        # exact copies first: an image that is both an exact and a near copy is reported as the exact one's
        return sorted([(i, j, True) for i, j in exact]) + sorted([(i, j, False) for i, j in near - exact])


def deduplicate(datasets: list, names: list[str], excluded: list[tuple[str, object]], progress: bool = True
                ) -> tuple[list[list[int]], list[dict]]:
    """The indices each source keeps, and one record per dropped image: a copy of an excluded (evaluation)
    image, of an image of an earlier source, or the same pixels again in one source (a manifest with one row per
    question lists an image many times). Near-copies within one source are left to ``medfm curate``."""
    fp = Fingerprints()
    for k, (name, ds) in enumerate(excluded):
        fp.add(-1 - k, ds, f"{name} (excluded)", progress)
    for s, ds in enumerate(datasets):
        fp.add(s, ds, names[s], progress)
    dropped: dict[int, dict] = {}
    for i, j, exact in fp.copies():
        a, b = sorted((i, j), key=lambda t: (fp.owner[t] >= 0, fp.owner[t], t))  # exclusions, then earlier sources
        if fp.owner[b] < 0 or (fp.owner[a] == fp.owner[b] and not exact) or b in dropped:
            continue
        why = ("evaluation image" if fp.owner[a] < 0 else "image of an earlier source" if fp.owner[a] != fp.owner[b]
               else "image listed earlier in the same source")
        other = excluded[-1 - fp.owner[a]][0] if fp.owner[a] < 0 else names[fp.owner[a]]
        dropped[b] = {"source": names[fp.owner[b]], "item": fp.where[b], "copy_of": fp.where[a],
                      "copy_of_source": other, "reason": f"a copy of an {why}"}
    keep = [[fp.index[t] for t in range(len(fp.owner)) if fp.owner[t] == s and t not in dropped]
            for s in range(len(datasets))]
    return keep, [dropped[t] for t in sorted(dropped)]


class MixtureDataset(Dataset):
    """``position -> sample`` of a mixture: the source from ``(seed, position)`` at the weights, then one of its
    kept images (with replacement). ``datasets`` are the sources (their training augmentation re-seeded per
    position by :class:`medfm.run.KeyedDataset`); ``keys`` are what a sample keeps (the image, and the text for
    image-text objectives)."""

    def __init__(self, datasets: list, keep: list[list[int]], weights: list[float], seed: int,
                 keys: tuple[str, ...] = ("image",)):
        for ds, k in zip(datasets, keep):
            if not k:
                raise DataError(f"{getattr(ds, 'manifest', None) or getattr(ds, 'path', '?')}: no image left "
                                "in this mixture source (empty, or every image a copy of an evaluation image)")
        self.datasets, self.keep, self.seed, self.keys = datasets, keep, seed, keys
        w = np.asarray(weights, dtype=np.float64)
        self.cumulative = np.cumsum(w / w.sum())

    def __len__(self) -> int:
        return sum(len(k) for k in self.keep)

    def pick(self, position: int) -> tuple[int, int]:
        """(source, dataset index) that sample ``position`` reads."""
        rng = np.random.default_rng([self.seed, position, 5])
        s = min(int(np.searchsorted(self.cumulative, rng.random(), side="right")), len(self.keep) - 1)
        return s, self.keep[s][int(rng.integers(len(self.keep[s])))]

    def __getitem__(self, position: int) -> dict:
        s, i = self.pick(position)
        sample = self.datasets[s][i]
        return {k: sample[k] for k in self.keys}


def build_mixture(entries: list, d, enc: dict, seed: int, needs_text: bool, cache_for, progress: bool = True
                  ) -> tuple[MixtureDataset, dict]:
    """The mixture of the recipe's ``data`` section ``d`` for the encoder section ``enc``, and its record.
    ``cache_for(preset_record)`` gives a source's preprocessed-image cache."""
    sources = parse_sources(entries, d.preset, d.preset_args)
    excluded = parse_excluded(d.exclude, d.exclude_suite, d.root)
    chans = enc.get("in_chans", 1)
    datasets, resolved = [], []
    for s in sources:
        if needs_text and not s.text:
            raise ValueError(f"data.sources: {s.name} has no `text` column; an image-text objective needs each "
                             "source's caption or report column")
        path = resolve_path(s.path, d.root)
        resolved.append(path)
        transform = with_channels(PRESETS[s.preset](size=None, **s.preset_args), chans)
        cache = cache_for({"preset": s.preset, "args": s.preset_args, "dims": enc["spatial_dims"], "chans": chans})
        kw = dict(spatial_dims=enc["spatial_dims"], transform=transform, cache=cache, on_error=d.on_error,
                  **({"text_key": s.text} if needs_text else {}))
        try:
            ds = open_dataset(path, split=s.split, **kw)
        except DataError as e:
            raise DataError(f"data.sources {s.name}: {e}") from None
        datasets.append(ds)
    held = []
    for e in excluded:
        e.path = resolve_path(e.path, d.root) if not os.path.exists(e.path) and data_root(d.root) else e.path
        if not os.path.exists(e.path):
            print(f"mixture: evaluation set {e.name or e.path} not found ({e.path}): nothing to exclude from it")
            continue
        try:
            held.append((e.name or f"{Path(e.path).stem}:{e.split}",
                         open_dataset(e.path, split=e.split, spatial_dims=enc["spatial_dims"])))
        except DataError as err:
            raise DataError(f"data.exclude {e.path} (split {e.split}): {err}") from None
    keep, dropped = deduplicate(datasets, [s.name for s in sources], held, progress)
    record = {
        "sources": [{**asdict(s), "resolved": path, "images": len(ds), "kept": len(k),
                     "dropped": len(ds) - len(k), "share": s.weight / sum(x.weight for x in sources)}
                    for s, path, ds, k in zip(sources, resolved, datasets, keep)],
        "excluded": [{"name": n, "images": len(ds)} for n, ds in held],
        "dropped": dropped,
        "sampling": "source by weight from (seed, position), then an image of it with replacement",
        "copy_checks": {"exact": "same pixels", "hash_distance": HASH_DISTANCE, "pixel_correlation": PIXEL_CORRELATION,
                        "crop_correlation": CROP_CORRELATION, "crop_confirm": CROP_CONFIRM},
    }
    print(summary(record))
    keys = ("image", "text") if needs_text else ("image",)
    return MixtureDataset(datasets, keep, [s.weight for s in sources], seed, keys), record


def summary(record: dict) -> str:
    """What a mixture holds and what it dropped, a few lines for the console."""
    lines = ["mixture: " + ", ".join(f"{s['name']} {s['kept']} images (weight {s['share']:.2f})"
                                     for s in record["sources"])]
    by = {}
    for d in record["dropped"]:
        by.setdefault((d["source"], d["copy_of_source"], d["reason"]), []).append(d)
    for (src, other, reason), items in by.items():
        lines.append(f"mixture: dropped {len(items)} image(s) of {src}, {reason} in {other} "
                     f"(first: {items[0]['item']} = {items[0]['copy_of']})")
    return "\n".join(lines)
