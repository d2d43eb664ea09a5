"""Write a synthetic set to disk: NIfTI images and label maps, a manifest, and a PNG contact sheet.

Files are byte-identical for the same arguments (gzip without timestamps), so a
synthetic set is reproducible from its seed and can be checked by hash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from medfm.progress import progress_bar

from medfm.data.writers import write_manifest, write_nifti

from medfm.figures import pyplot, save_figure

from .engine import SynthConfig, synth_sample


def contact_sheet(samples: list[dict], path: Path) -> Path:
    """PNG: one column per sample, image on top and its label map below (mid-slice for volumes)."""
    plt = pyplot()

    n = len(samples)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 3.8), squeeze=False)
    for j, s in enumerate(samples):
        img, lab = s["image"][0].numpy(), s["mask"][0].numpy()
        if img.ndim == 3:
            img, lab = img[:, :, img.shape[2] // 2], lab[:, :, lab.shape[2] // 2]
        axes[0, j].imshow(img.T, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[1, j].imshow(lab.T, cmap="tab10", origin="lower", interpolation="nearest")
        axes[0, j].set_title(f"#{s['meta']['index']} {s['meta']['label_kind']}", fontsize=8)
        for ax in axes[:, j]:
            ax.set_axis_off()
    return save_figure(fig, path, dpi=90)


def export_synthetic(config: SynthConfig, n: int, out: str | os.PathLike, seed: int = 0, sheet: int = 8,
                     progress: bool = True, describe: Callable[[dict], dict] | None = None) -> Path:
    """Write ``n`` samples to ``out`` (images/, labels/, manifest.csv, contact_sheet.png); returns the manifest.
    ``describe(sample)`` adds manifest columns per sample (e.g. a templated report and its split)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rows, shown = [], []
    for i in progress_bar(range(n), desc=f"synth {config.spatial_dims}D {config.shape}", disable=not progress):
        s = synth_sample(config, seed, i)
        name = f"synth_{i:05d}.nii.gz"
        write_nifti(s["image"][0].numpy().astype(np.float32), out / "images" / name)
        write_nifti(s["mask"][0].numpy().astype(np.uint8 if config.n_labels < 256 else np.int16), out / "labels" / name)
        rows.append({"image": f"images/{name}", "mask": f"labels/{name}", "split": "train", "seed": seed, "index": i,
                     "label_kind": s["meta"]["label_kind"], **(describe(s) if describe else {})})
        if len(shown) < sheet:
            shown.append(s)
    manifest = write_manifest(out / "manifest.csv", rows)
    if shown:
        contact_sheet(shown, out / "contact_sheet.png")
    return manifest
