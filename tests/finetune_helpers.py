"""Tiny task recipes and real labelled data (MNI152 tissue maps) for the fine-tuning tests."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

from medfm.data import samples
from medfm.data.writers import write_manifest
from medfm.finetune.recipe import load_task_recipe

from .conftest import REPO

# what the fine-tuning tests change on top of the product's `--profile tiny` (medfm.run.profiles): 4-voxel patches
# and 30 steps at a higher LR, so that a loss has room to fall; HD95 on (the profile leaves it out for speed)
TINY = {
    "encoder": {"patch_size": 4},
    "data": {"batch_size": 16},
    "optim": {"lr": 3e-3, "warmup_steps": 0},
    "trainer": {"max_steps": 30, "enable_progress_bar": False, "checkpoint_every_n_steps": 10},
}


def tiny_task(name: str, **sections) -> dict:
    """A recipe of tasks/ at the product's ``--profile tiny`` (32 px / 32^3 inputs, ViT-Micro) with :data:`TINY`
    and ``sections`` on top."""
    over = {k: dict(v) for k, v in TINY.items()}
    if "_3d" in name:
        over["data"].update(batch_size=2)
    if name.startswith("segment"):
        over["segmentation"] = {"num_classes": 3, "class_names": ["background", "grey matter", "white matter"],
                                "hd95": True}
    for k, v in sections.items():
        if isinstance(v, dict):
            over.setdefault(k, {}).update(v)
        else:
            over[k] = v
    return load_task_recipe(REPO / "tasks" / f"{name}.yaml", over, profile="tiny")


def tissue_labels() -> tuple:
    """The MNI152 T1 brain and its tissue label map: 1 grey matter, 2 white matter (probability > 0.5)."""
    return samples.mni152_tissue()


def mni_hemispheres(tmp: Path) -> Path:
    """A segmentation manifest: the left hemisphere (train) and the right one (val) of the MNI152 brain."""
    return samples.mni152_hemispheres(tmp / "mni_hemi")


def mni_slices(tmp: Path, n: int = 12) -> Path:
    """A 2D segmentation manifest: axial MNI152 slices (PNG) and their tissue labels (PNG), 3/4 train, 1/4 val."""
    from PIL import Image

    t1, lab = tissue_labels()
    vol = np.asarray(t1.dataobj, dtype=np.float32)
    d = tmp / "mni_slices"
    d.mkdir(exist_ok=True)
    rows = []
    for i, z in enumerate(np.linspace(50, 130, n).astype(int)):
        sl = vol[:, :, z]
        Image.fromarray((255 * sl / sl.max()).astype(np.uint8)).save(d / f"t1_{z}.png")
        Image.fromarray(lab[:, :, z]).save(d / f"tissue_{z}.png")
        rows.append({"image": f"t1_{z}.png", "mask": f"tissue_{z}.png", "split": "val" if i % 4 == 3 else "train"})
    return write_manifest(d / "manifest.csv", rows)


def mni_map_classes(tmp: Path) -> Path:
    """A 3D classification manifest: which MNI152 map a volume is (T1, grey- or white-matter probability);
    left hemispheres train, right hemispheres validate."""
    d = tmp / "mni_maps"
    d.mkdir(exist_ok=True)
    rows = []
    for kind in ("t1", "gm", "wm"):
        img = nib.load(samples.mni152(kind))
        mid = samples.midline_index(img)
        for side, sl, split in (("left", slice(0, mid), "train"), ("right", slice(mid, None), "val")):
            nib.save(img.slicer[sl], d / f"{side}_{kind}.nii.gz")
            rows.append({"image": f"{side}_{kind}.nii.gz", "split": split, "map": kind})
    return write_manifest(d / "manifest.csv", rows)


def labelled_volumes(root: Path, shapes, spacings, ct: bool = False, seed: int = 0) -> Path:
    """One case per (shape, spacing): an MR-like (or CT-like, in HU) volume with two labelled ellipsoids."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = []
    for i, (shape, spacing) in enumerate(zip(shapes, spacings)):
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
        r = np.sqrt((grid**2).sum(0))
        label = np.zeros(shape, np.uint8)
        label[(r < 0.5) & (grid[0] < 0)] = 1
        label[(r < 0.5) & (grid[0] >= 0)] = 2
        base = rng.normal(0, 1, shape) * 10
        image = (np.where(label > 0, 40.0, -1000.0) if ct else np.where(label > 0, 300.0, 100.0)) + base
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "images" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"c{i}.nii.gz")
        rows.append({"image": f"images/c{i}.nii.gz", "mask": f"labels/c{i}.nii.gz",
                     "split": "val" if i % 4 == 3 else "train"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "mask", "split"])
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"
