"""The fingerprint of a segmentation set: what nnU-Net measures before it plans (Isensee et al., Nature Methods
2021, "dataset fingerprint"), read from a manifest's images and masks.

Per case, in RAS order (the axes the presets resample in): voxel spacing, shape, the label values present
and each class's volume, and the image intensities inside the foreground (a sample of them, per channel).
Over the set: the median spacing and shape, the label values (the class count comes from them), how often
and how large each class is, intensity percentiles / mean / std inside the foreground per channel, and the
modality (``ct`` when intensities reach Hounsfield air, ``mr`` otherwise, ``image`` for 2D pictures; a
``modality`` column of the manifest decides where present). :mod:`medfm.finetune.planning` turns it into a
plan.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass, field

import nibabel as nib
import numpy as np

from .errors import DataError
from .io import load, load_mask
from .manifest import read_records
from .transforms import PRESETS

SAMPLES_PER_CASE = 10_000  # foreground intensities kept per case for the percentiles (nnU-Net keeps 10 k)


@dataclass
class Fingerprint:
    """What :func:`fingerprint` measured (RAS axis order; spacings in mm, volumes in mm^3)."""

    manifest: str
    split: str | None
    n_cases: int
    spatial_dims: int
    channels: int
    modality: str  # ct | mr | image
    spacings: list  # per case
    shapes: list  # per case, voxels
    labels: list  # label values present in any mask (0 = background)
    class_cases: dict  # label -> number of cases that hold it
    class_volume: dict  # label -> median volume (mm^3) over the cases that hold it
    intensity: list  # per channel: {"mean", "std", "p00_5", "p99_5", "min", "max"} inside the foreground
    native_spacing_varies: bool = False
    notes: list = field(default_factory=list)

    @property
    def median_spacing(self) -> list[float]:
        return [float(v) for v in np.median(np.asarray(self.spacings, dtype=float), axis=0)]

    @property
    def median_shape(self) -> list[float]:
        return [float(v) for v in np.median(np.asarray(self.shapes, dtype=float), axis=0)]

    @property
    def num_classes(self) -> int:
        """Classes including background: the largest label value present plus one."""
        return int(max(self.labels)) + 1

    def record(self) -> dict:
        """A JSON-ready record (per-case lists included)."""
        out = asdict(self)
        out.update(median_spacing=self.median_spacing, median_shape=self.median_shape, num_classes=self.num_classes)
        return out


def _ras(values, affine: np.ndarray, dims: int) -> list[float]:
    """Per-axis ``values`` reordered from the file's voxel axes to RAS (what the presets' Orientationd does)."""
    if dims != 3:
        return [float(v) for v in values]
    order = nib.io_orientation(np.asarray(affine, dtype=float))[:, 0].astype(int)  # voxel axis i -> RAS axis
    out = [0.0] * 3
    for i, axis in enumerate(order):
        out[axis] = float(values[i])
    return out


def _modality(low: float, given: set[str], dims: int) -> str:
    if given:
        m = sorted(given)[0].strip().lower()
        return "ct" if m.startswith("ct") else ("mr" if m.startswith(("mr", "t1", "t2", "flair")) else m)
    if dims == 2:
        return "image"
    return "ct" if low < -500 else "mr"  # Hounsfield air is -1000; MR has no absolute units


def fingerprint(manifest: str | os.PathLike, split: str | None = "train", image_key: str = "image",
                mask_key: str = "mask", max_cases: int | None = None, seed: int = 0) -> Fingerprint:
    """Read every case of ``split`` (or the first ``max_cases``) of a segmentation manifest and measure it.

    A mask whose shape differs from its image's, or whose values are not whole numbers >= 0, is an error naming
    both files and the manifest line.
    """
    records, _, _ = read_records(manifest, split=split, image_key=image_key, mask_key=mask_key)
    if max_cases:
        records = records[:max_cases]
    rng = np.random.default_rng(seed)
    spacings, shapes, labels, cases, volumes, samples, low, modalities = [], [], set(), {}, {}, [], np.inf, set()
    dims = channels = None
    for rec in records:
        where = f"{manifest} line {rec.line}"
        image, mask = load(rec.image), load_mask(rec.mask)
        img, msk = np.asarray(image["image"]), np.asarray(mask["image"])
        if img.shape[1:] != msk.shape[1:]:
            raise DataError(f"{where}: the mask {rec.mask} is {msk.shape[1:]} but the image {rec.image} is {img.shape[1:]}")
        labels_here = np.unique(msk)
        if (labels_here < 0).any() or (labels_here != np.round(labels_here)).any():
            raise DataError(f"{where}: {rec.mask} holds values {labels_here[:5].tolist()}: a label map needs whole "
                            "numbers >= 0 (0 background, 1..K-1 the classes)")
        meta = image["meta"]
        dims, channels = meta["spatial_dims"], img.shape[0]
        spacing = list(meta["spacing"])[:dims]
        spacings.append(_ras(spacing, meta["affine"], dims))
        shapes.append(_ras(img.shape[1:], meta["affine"], dims))
        voxel = float(np.prod(spacing))
        fg = msk[0] > 0
        for v in labels_here.astype(int):
            labels.add(int(v))
            if v > 0:
                cases[v] = cases.get(v, 0) + 1
                volumes.setdefault(v, []).append(float((msk[0] == v).sum()) * voxel)
        inside = img[:, fg] if fg.any() else img.reshape(img.shape[0], -1)
        take = rng.choice(inside.shape[1], min(SAMPLES_PER_CASE, inside.shape[1]), replace=False)
        samples.append(inside[:, take])
        low = min(low, float(img.min()))
        if rec.extra.get("modality"):
            modalities.add(str(rec.extra["modality"]))
    values = np.concatenate(samples, axis=1)
    intensity = [{"mean": float(c.mean()), "std": float(c.std()), "p00_5": float(np.percentile(c, 0.5)),
                  "p99_5": float(np.percentile(c, 99.5)), "min": float(c.min()), "max": float(c.max())} for c in values]
    sp = np.asarray(spacings)
    fp = Fingerprint(manifest=str(manifest), split=split, n_cases=len(records), spatial_dims=dims, channels=channels,
                     modality=_modality(low, modalities, dims), spacings=spacings, shapes=shapes,
                     labels=sorted(labels), class_cases={int(k): v for k, v in sorted(cases.items())},
                     class_volume={int(k): float(np.median(v)) for k, v in sorted(volumes.items())},
                     intensity=intensity, native_spacing_varies=bool((sp.max(0) > 1.05 * sp.min(0)).any()))
    if fp.labels == [0]:
        raise DataError(f"{manifest}: no mask of split {split!r} holds a label other than 0 (background): nothing to segment")
    return fp


def native_spacing(manifest: str | os.PathLike, split: str | None = "train", image_key: str = "image",
                   n: int = 20) -> list[float] | None:
    """The median RAS spacing of the first ``n`` NIfTI images of a split, read from their headers alone (no
    voxels); None when the split holds no NIfTI files (DICOM and pictures are not looked at)."""
    records, _, _ = read_records(manifest, split=split, image_key=image_key)
    found = []
    for rec in records:
        if not rec.image.lower().endswith((".nii", ".nii.gz")):
            continue
        header = nib.load(rec.image)
        found.append(_ras(header.header.get_zooms()[:3], header.affine, 3))
        if len(found) >= n:
            break
    return [float(v) for v in np.median(found, 0)] if found else None


PLAN_REMEDY = "`--plan auto` (or `medfm plan`) takes the spacing from the data"


def resampling_note(manifest: str | os.PathLike, spacing, split: str | None = "train", far: float = 1.5,
                    remedy: str = PLAN_REMEDY) -> str | None:
    """One line when resampling to ``spacing`` (a preset's ``spacing``) moves any axis more than ``far`` times
    from the set's native spacing (how a 35x50x35 mm hippocampus became 12x17x12 voxels at 3 mm), ending with
    ``remedy``; None otherwise."""
    native = native_spacing(manifest, split)
    if native is None or spacing is None:
        return None
    target = [float(spacing)] * 3 if np.isscalar(spacing) else [float(v) for v in spacing]
    ratio = [t / s for t, s in zip(target, native)]
    if all(1 / far <= r <= far for r in ratio):
        return None
    fmt = lambda v: " x ".join(f"{a:g}" for a in v)  # noqa: E731
    return (f"{manifest}: resampled from its native spacing {fmt(native)} mm to {fmt(target)} mm "
            f"(data.preset_args.spacing), {max(ratio):.1f}x coarser on its coarsest axis: small structures lose "
            f"their voxels; {remedy}")


def recipe_resampling_note(path: str | os.PathLike, preset: str, preset_args: dict, split: str | None = "train",
                           remedy: str = PLAN_REMEDY) -> str | None:
    """:func:`resampling_note` for a 3D recipe's data: the spacing its ``preset`` resamples to (``preset_args``'
    ``spacing``, else the preset's own default); None for data that is not a manifest (an npz, a folder)."""
    if not str(path).lower().endswith((".csv", ".jsonl", ".json")):
        return None
    default = inspect.signature(PRESETS[preset]).parameters["spacing"].default
    return resampling_note(path, dict(preset_args).get("spacing", default), split, remedy=remedy)
