"""Generated sets on disk: images (PNG in 2D, NIfTI in 3D), their label maps, a manifest, a grid.

The manifest (``manifest.csv``) is an ordinary medfm manifest, so every recipe reads a generated set as
``data``: ``image``, ``split`` (``train``), the condition (``label`` = class name, ``text`` = prompt, or
``mask`` = the label-map file the image was generated for), and how each file was made: ``seed``
(sample ``i`` of a call is seeded by ``seed + i`` and regenerates alone), ``sampler``, ``steps``,
``guidance_scale`` and ``model`` (the first 16 hex digits of the SHA-256 of the generator's
``model.safetensors``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from medfm.progress import progress_bar

from medfm.artifacts import WEIGHTS_NAME, artifact_folder
from medfm.data.writers import write_manifest, write_nifti, write_png
from medfm.evaluate.plots import middle_slice
from medfm.figures import pyplot, save_figure

from .generator import DiffusionGenerator


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) of a generator's weights: a model folder or its run folder."""
    weights = artifact_folder(path) / WEIGHTS_NAME
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def sample_grid(images: torch.Tensor, path: str | os.PathLike, generator: DiffusionGenerator | None = None,
                cond: dict | None = None, title: str = "", columns: int = 8) -> Path:
    """PNG grid of samples (middle slices of volumes), each titled with its class or prompt; for mask
    conditioning each sample has its label map drawn beneath it."""
    plt = pyplot()
    cond = cond or {}
    names = (generator.spec.class_names if generator is not None else None) or []
    n = len(images)
    cols = min(columns, n)
    masks = cond.get("masks")
    rows_per = 2 if masks is not None else 1
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows * rows_per, cols, figsize=(1.7 * cols, 1.8 * rows * rows_per), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        r, c = divmod(i, cols)
        ax = axes[r * rows_per, c]
        ax.imshow(middle_slice(images[i]), cmap="gray", vmin=0, vmax=1)
        if "classes" in cond:
            k = cond["classes"][i]
            ax.set_title(str(names[k] if isinstance(k, int) and k < len(names) else k), fontsize=7)
        elif "prompts" in cond:
            ax.set_title(str(cond["prompts"][i])[:28], fontsize=5)
        if masks is not None:
            axes[r * rows_per + 1, c].imshow(middle_slice(torch.as_tensor(masks[i]).float().reshape(images[i].shape)),
                                             cmap="tab10", interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path, dpi=100)


def export_generated(generator: DiffusionGenerator, out: str | os.PathLike, classes: Sequence | None = None,
                     prompts: Sequence[str] | None = None, masks: Sequence[torch.Tensor] | None = None,
                     mask_sources: Sequence[str] | None = None, n: int | None = None, seed: int = 0,
                     steps: int | None = None, sampler: str | None = None, guidance_scale: float | None = None,
                     batch_size: int = 32, model: str = "", progress: bool = True, grid: int = 32) -> Path:
    """Generate one sample per class / prompt / mask (or ``n`` unconditional ones) into ``out``:
    ``images/``, ``labels/`` (mask conditioning), ``manifest.csv``, ``grid.png``. Returns the manifest."""
    spec = generator.spec
    steps, sampler = steps or spec.sample_steps, sampler or spec.sampler
    scale = spec.guidance_scale if guidance_scale is None else guidance_scale
    conds = {"classes": classes, "prompts": prompts, "masks": masks}
    given = {k: list(v) for k, v in conds.items() if v is not None}
    total = len(next(iter(given.values()))) if given else (n or 0)
    if total < 1:
        raise ValueError("nothing to generate: give n (unconditional) or at least one class, prompt or mask")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks is not None:
        (out / "labels").mkdir(parents=True, exist_ok=True)
    spacing = (spec.preprocess or {}).get("args", {}).get("spacing", 1.0)
    affine = np.diag([*np.broadcast_to(np.asarray(spacing, dtype=float), (3,)), 1.0])
    names = spec.class_names or []
    rows, shown, shown_cond = [], [], {k: [] for k in given}
    bar = progress_bar(total=total, desc=f"generating {total} ({sampler}, {steps} steps)", unit="img", disable=not progress)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        part = {k: v[start:stop] for k, v in given.items()}
        images = generator.generate(**part, n=stop - start, seed=seed + start, steps=steps, sampler=sampler,
                                    guidance_scale=scale, batch_size=batch_size)
        for j, img in enumerate(images):
            i = start + j
            row = {"image": "", "split": "train"}
            if spec.spatial_dims == 2:
                row["image"] = f"images/gen_{i:05d}.png"
                write_png(img.numpy(), out / row["image"])
            else:
                row["image"] = f"images/gen_{i:05d}.nii.gz"
                write_nifti(img[0].numpy().astype(np.float32), out / row["image"], affine)
            if "classes" in part:
                k = generator.class_indices([part["classes"][j]])[0].item()
                row["label"] = names[k] if k < len(names) else str(k)
            if "prompts" in part:
                row["text"] = part["prompts"][j]
            if "masks" in part:
                row["mask"] = f"labels/gen_{i:05d}.nii.gz"
                m = torch.as_tensor(part["masks"][j]).reshape(img.shape[1:])
                write_nifti(m.numpy().astype(np.uint8 if spec.mask_classes < 256 else np.int16), out / row["mask"], affine)
                if mask_sources is not None:
                    row["mask_source"] = str(mask_sources[i])
            row.update(seed=seed + i, sampler=sampler, steps=steps, guidance_scale=scale,
                       conditioning=generator.conditioning, model=model)
            rows.append(row)
            if len(shown) < grid:
                shown.append(img)
                for k in given:
                    shown_cond[k].append(part[k][j])
        bar.update(stop - start)
    bar.close()
    manifest = write_manifest(out / "manifest.csv", rows)
    sample_grid(torch.stack(shown), out / "grid.png", generator, shown_cond,
                title=f"{total} generated ({sampler}, {steps} steps, guidance {scale}); first {len(shown)}")
    return manifest
