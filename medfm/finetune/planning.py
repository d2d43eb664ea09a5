"""Segmentation planned from the data, as nnU-Net plans it (Isensee et al., Nature Methods 2021): a
:class:`~medfm.data.fingerprint.Fingerprint` in, a :class:`Plan` out, and the plan as recipe overrides that a
user can read and edit (``medfm plan DATA --out plan.yaml``) or that ``--plan auto`` applies on the fly.

The rules, each nnU-Net's:

* **spacing**: the median spacing of the training cases; where one axis is more than 3x coarser than the others
  and its median extent is more than 3x smaller, that axis takes the 10th percentile of its spacings instead
  (never finer than the other axes).
* **patch**: the median shape at that spacing, shrunk along its largest axis until it fits the voxel budget,
  then rounded up to a multiple of each axis's downsampling factor.
* **network depth**: an axis is halved while it stays >= 4 voxels (at most 5 times); an axis more than 2x coarser
  than the finest keeps a kernel of 1 and is not pooled until the others catch up (anisotropic data).
* **normalisation**: CT, clipped to the foreground's 0.5 / 99.5 percentiles and z-scored with the foreground's
  mean and std over the set; anything else (MR, photographs), each image z-scored on its own.
* **batch size**: as many patches as the budget allows, at least 2, and at most 5 % of the set's voxels per batch.
* **foreground oversampling**: a third of the patches are centred on a foreground voxel.
* **optimiser**: nnU-Net's poly learning-rate decay and weight decay 3e-5, with AdamW at 2e-3 (nnU-Net's SGD at
  1e-2 with momentum 0.99 needs its 250,000 steps; a CPU run has hundreds).
* **classes**: the label values found in the masks (the user need not know the count).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import yaml

from medfm.data.fingerprint import Fingerprint, fingerprint
from medfm.run.profiles import plan_limits

BUDGET = {3: 128 * 128 * 128, 2: 1024 * 1024}  # voxels of one patch: nnU-Net's patches on a 10 GB GPU are this order
BATCH_BUDGET = {3: 2 * 128**3, 2: 12 * 512**2}  # voxels of one batch
MIN_FEATURE = 4  # an axis is pooled while it stays at least this long (nnU-Net)
MAX_POOLS = 5
FOREGROUND = 1 / 3  # nnU-Net's oversample_foreground_percent
ANISOTROPY = 3.0
# a U-Net from random initialisation: AdamW at 2e-3 with nnU-Net's poly decay and its small weight decay (measured on
# hippocampus, 500 CPU steps, benchmarks/RESULTS.md: validation mean Dice 0.756 at the recipe's 3e-4 cosine, 0.868 here)
OPTIM = {"lr": 2e-3, "schedule": "poly", "weight_decay": 3e-5}


@dataclass
class Plan:
    """What the data implies for a segmentation run (RAS axis order)."""

    spatial_dims: int
    spacing: list
    median_shape: list  # at ``spacing``
    patch: list
    pools: list  # downsamplings per axis
    kernel_size: list  # per stage, per axis
    strides: list  # per stage, per axis
    normalization: str  # zscore (per image) | ct (clip + the set's foreground mean / std)
    ct_stats: list | None  # [clip low, clip high, mean, std] for ct
    batch_size: int
    foreground: float
    num_classes: int
    class_names: list
    modality: str
    native_spacing: list  # the set's median spacing before the plan
    channels: int = 1

    def record(self) -> dict:
        return asdict(self)


def target_spacing(fp: Fingerprint) -> list[float]:
    """The median spacing; the anisotropic rule on the coarsest axis (see the module docstring)."""
    spacings, shapes = np.asarray(fp.spacings, float), np.asarray(fp.shapes, float)
    target = np.median(spacings, 0)
    if fp.spatial_dims < 3:
        return [float(v) for v in target]
    size = np.median(shapes * spacings / target, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if target[worst] > ANISOTROPY * min(target[others]) and size[worst] * ANISOTROPY < min(size[others]):
        coarse = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(coarse, max(target[others]) + 1e-5)
    return [float(round(v, 5)) for v in target]


def _pools(patch: list[float], spacing: list[float], exact: bool = False) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Downsamplings per axis and the per-stage kernels / strides of a U-Net on ``patch`` at ``spacing``
    (``exact``: an axis is only halved while its length stays a whole number)."""
    dims = len(patch)
    size, sp = [float(p) for p in patch], list(spacing)
    pools, kernels, strides = [0] * dims, [], [[1] * dims]
    while True:
        finest = min(sp)
        kernel = [3 if s <= 2 * finest else 1 for s in sp]
        pool = [1 if (size[i] / 2 >= MIN_FEATURE and pools[i] < MAX_POOLS and sp[i] <= 2 * finest
                      and (not exact or size[i] % 2 == 0)) else 0 for i in range(dims)]
        kernels.append(kernel)
        if not any(pool):
            break
        strides.append([2 if p else 1 for p in pool])
        for i in range(dims):
            if pool[i]:
                pools[i] += 1
                size[i] /= 2
                sp[i] *= 2
    return pools, kernels, strides


def unet_stages(patch: list[int], spacing: list[float] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """The kernels and strides per stage of a U-Net on ``patch`` (isotropic spacing unless given)."""
    _, kernels, strides = _pools(patch, spacing or [1.0] * len(patch), exact=True)
    return kernels, strides


def make_plan(fp: Fingerprint, budget: int | None = None, batch_budget: int | None = None) -> Plan:
    """The plan for the fingerprinted set (``budget``: the largest patch, in voxels)."""
    dims = fp.spatial_dims
    budget = budget or BUDGET[dims]
    spacing = target_spacing(fp)
    shapes, spacings = np.asarray(fp.shapes, float), np.asarray(fp.spacings, float)
    median = [float(v) for v in np.median(shapes * spacings / np.asarray(spacing), 0)]
    patch = list(median)
    while math.prod(patch) > budget:  # the longest axis (in mm) shrinks by 10 % until the patch fits
        i = int(np.argmax([p * s for p, s in zip(patch, spacing)]))
        patch[i] *= 0.9
    pools, kernels, strides = _pools(patch, spacing)
    patch = [int(math.ceil(p / 2**k) * 2**k) for p, k in zip(patch, pools)]
    voxels = math.prod(patch)
    set_voxels = float(np.sum(np.prod(shapes * spacings / np.asarray(spacing), 1)))
    batch = int(max(2, min((batch_budget or BATCH_BUDGET[dims]) // voxels, 0.05 * set_voxels // voxels)))
    ct = fp.modality == "ct"
    stats = fp.intensity[0]  # CT: the first channel (a CT set has one)
    k = fp.num_classes
    return Plan(spatial_dims=dims, spacing=spacing, median_shape=[round(m, 1) for m in median], patch=patch,
                pools=pools, kernel_size=kernels, strides=strides, normalization="ct" if ct else "zscore",
                ct_stats=[stats["p00_5"], stats["p99_5"], stats["mean"], stats["std"]] if ct else None,
                batch_size=batch, foreground=round(FOREGROUND, 4), num_classes=k,
                class_names=["background"] + [f"class {i}" for i in range(1, k)], modality=fp.modality,
                native_spacing=fp.median_spacing, channels=fp.channels)


def plan_overrides(plan: Plan, cfg: dict | None = None) -> dict:
    """The plan as recipe overrides of a segmentation recipe (``tasks/segment_3d.yaml``, ``segment_2d``):
    the network (``auto``: the encoder's own MONAI network where its family has one, else MONAI's DynUNet with the
    planned stages and deep supervision from random initialisation; see
    :func:`medfm.finetune.segmentation.resolve_network`), patch, spacing, normalisation, classes, batch size and
    foreground oversampling. ``cfg`` (the recipe) keeps its own class names when they have the planned count."""
    dims = plan.spatial_dims
    if dims == 3:
        preset = "ct_3d" if plan.normalization == "ct" else "mr_3d"
        args: dict = {"spacing": plan.spacing, "foreground": plan.foreground}
        if plan.normalization == "ct":
            args.update(window=plan.ct_stats[:2], zscore_stats=plan.ct_stats[2:])
        else:
            args["normalize"] = "zscore"
    else:
        preset, args = "radiograph_2d", {"normalize": "zscore"}
    names = ((cfg or {}).get("segmentation") or {}).get("class_names")
    return {
        "optim": dict(OPTIM),
        "encoder": {"img_size": plan.patch, "spatial_dims": dims, "in_chans": plan.channels},
        "segmentation": {"network": "auto", "num_classes": plan.num_classes,
                         "class_names": names if names and len(names) == plan.num_classes else plan.class_names,
                         "kernel_size": plan.kernel_size, "strides": plan.strides, "deep_supervision": True},
        "data": {"preset": preset, "preset_args": args, "batch_size": plan.batch_size},
    }


def describe(fp: Fingerprint, plan: Plan) -> str:
    """The fingerprint and plan as a Markdown table a person reads."""
    x = " x ".join
    fmt = lambda v: x(f"{a:g}" for a in v)  # noqa: E731
    rows = [
        ("cases", f"{fp.n_cases} ({fp.split or 'all'})"), ("modality", fp.modality), ("channels", fp.channels),
        ("native spacing (median)", fmt(fp.median_spacing) + (" (varies)" if fp.native_spacing_varies else "")),
        ("median shape (native)", fmt(fp.median_shape)),
        ("labels", ", ".join(f"{v}" for v in fp.labels) + f" -> {plan.num_classes} classes"),
        ("class volume (median, mm^3)", ", ".join(f"{k}: {v:.0f} in {fp.class_cases[k]} cases"
                                                  for k, v in fp.class_volume.items())),
        ("foreground intensity", f"mean {fp.intensity[0]['mean']:.4g}, std {fp.intensity[0]['std']:.4g}, "
                                 f"0.5-99.5 % {fp.intensity[0]['p00_5']:.4g} .. {fp.intensity[0]['p99_5']:.4g}"),
        ("**target spacing**", fmt(plan.spacing)), ("median shape at it", fmt(plan.median_shape)),
        ("**patch**", x(str(p) for p in plan.patch)), ("downsamplings per axis", x(str(p) for p in plan.pools)),
        ("network", f"auto: the encoder's own MONAI network (SegResNet under --profile cpu, a pretrained family's), "
                    f"else DynUNet of {len(plan.strides)} stages; deep supervision"),
        ("**normalisation**", "CT: clip %.4g .. %.4g, z-score (mean %.4g, std %.4g)" % tuple(plan.ct_stats)
         if plan.ct_stats else "z-score per image"),
        ("batch size", plan.batch_size), ("foreground oversampling", f"{plan.foreground:.2f}"),
        ("optimiser", f"AdamW {OPTIM['lr']:g}, {OPTIM['schedule']} decay, weight decay {OPTIM['weight_decay']:g}"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def flat_overrides(overrides: dict, prefix: str = "") -> list[str]:
    """Nested overrides as ``KEY=VALUE`` strings (JSON values), the form the command line passes."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            out += flat_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def plan_data(data: str | os.PathLike, split: str | None = "train", mask_key: str = "mask",
              max_cases: int | None = None, profile: str | None = None) -> tuple[Fingerprint, Plan]:
    """Fingerprint a segmentation manifest's training split and plan from it; ``profile`` (``cpu``) caps the
    patch and batch at its voxel budgets (``medfm.run.profiles``): the patch shrinks along its longest axis as any
    plan's does, the spacing, classes and normalisation are the data's either way."""
    fp = fingerprint(data, split=split, mask_key=mask_key, max_cases=max_cases)
    return fp, make_plan(fp, **plan_limits(profile, fp.spatial_dims))


def plan_recipe_text(fp: Fingerprint, plan: Plan, cfg: dict) -> str:
    """The planned recipe (``cfg``: the segmentation recipe with the plan applied) as YAML, the fingerprint and
    the plan in its header comment."""
    head = "\n".join(f"# {line}" for line in describe(fp, plan).splitlines())
    return (f"# planned by `medfm plan` from {fp.manifest} ({fp.n_cases} {fp.split or 'all'} cases); edit freely.\n"
            f"# Run: medfm finetune THIS_FILE --out runs/planned [--profile cpu]\n{head}\n"
            + yaml.safe_dump(cfg, sort_keys=False))
