"""Tiny pretraining recipes and real data for the pretraining tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medfm.data import load
from medfm.pretrain import load_recipe

from .conftest import REPO, SHARED

# what the pretraining tests change on top of the product's `--profile tiny` (medfm.run.profiles): 30 steps, so that
# a loss has room to fall, and DINO's schedules without warm-up
TINY = {
    "dino": {"freeze_last_layer_steps": 0, "warmup_teacher_temp_steps": 0},
    "data": {"batch_size": 8},
    "optim": {"lr": 1e-3, "warmup_steps": 2},
    "trainer": {"max_steps": 30, "enable_progress_bar": False, "checkpoint_every_n_steps": 10},
}


def tiny_recipe(name: str, **sections) -> dict:
    """A recipe of encoders/ at the product's ``--profile tiny`` (32 px / 32^3 views, ViT-Micro/8) with
    :data:`TINY` and ``sections`` on top."""
    over = {k: dict(v) for k, v in TINY.items()}
    if name.startswith("dino"):
        over["view"] = {"n_local": 2}
    if "_3d" in name:
        over["data"]["preset"] = "mr_3d"
    for k, v in sections.items():
        over.setdefault(k, {}).update(v)
    return load_recipe(REPO / "encoders" / f"{name}.yaml", over, profile="tiny")


def mni_folder(tmp: Path) -> Path:
    """A folder holding the real MNI152 T1 brain (3D pretraining data, CI-sized views are crops of it)."""
    from medfm.data import samples

    d = tmp / "mni3d"
    d.mkdir(exist_ok=True)
    (d / "t1.nii.gz").write_bytes(Path(samples.mni152("t1")).read_bytes())
    return d


def spread(array: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows spread evenly over ``array`` (a MedMNIST split is stored sorted by label: its first rows are one
    class), so a subset keeps every class in its proportion."""
    return array[np.linspace(0, len(array) - 1, min(n, len(array))).astype(int)]


def data_2d(tmp: Path, n_train: int = 800, n_val: int = 200) -> str:
    """``n_train`` / ``n_val`` real PneumoniaMNIST images spread over each split (../shared/data) when present (a run reads every
    image of a split once: a few hundred teach a tiny model as much as 4,406 do, in a fifth of the time), else
    axial slices of the MNI152 brain as PNGs + a manifest."""
    npz = SHARED / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
    if npz.exists():
        subset = tmp / "pneumoniamnist_subset.npz"
        with np.load(npz) as d:
            np.savez(subset, **{k: spread(d[k], n_train if k.startswith("train") else n_val) for k in d.files})
        return str(subset)
    from PIL import Image

    from medfm.data import samples

    vol = load(samples.mni152("t1"))["image"][0].numpy()
    d = tmp / "mni2d"
    d.mkdir(exist_ok=True)
    rows = []
    for i, z in enumerate(range(40, 150, 2)):
        sl = vol[:, :, z]
        img = (255 * (sl - sl.min()) / max(np.ptp(sl), 1e-6)).astype(np.uint8)
        Image.fromarray(img).save(d / f"z{z}.png")
        rows.append({"image": f"z{z}.png", "split": "train" if i % 4 else "val", "label": int(z > 95)})
    with open(d / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "split", "label"])
        w.writeheader()
        w.writerows(rows)
    return str(d / "manifest.csv")


def losses(run: Path, name: str = "metrics.csv") -> list[float]:
    with open(run / "logs" / name) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
