"""Volumes with reports whose truth is known: engine samples described by a template.

There are no real 3D image-report pairs here, so the 3D report-generation check uses the synthesis
engine: each volume holds one random structure (``kind: shapes``, two labels) and its report names three
attributes measured on the label map and the image: the *side* of the structure's centre (``left`` /
``right`` half along the first axis), its *size* (``small`` / ``large``: under or over 15 % of the
volume) and its *contrast* (``bright`` / ``dark``: mean intensity above or below the background's).
A generated report is then scored by whether it names each attribute's true value
(:func:`medfm.evaluate.report_metrics.mention_scores`). Real 3D report data comes in the same manifest
format (``image``, ``text``, ``split``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .engine import SynthConfig
from .export import export_synthetic

ATTRIBUTES: dict[str, tuple[str, ...]] = {"side": ("left", "right"), "size": ("small", "large"),
                                          "contrast": ("bright", "dark")}
LARGE_FRACTION = 0.15


def describe_structure(sample: dict) -> dict:
    """The attributes of a sample's structure (label > 0) and the templated report naming them."""
    mask, image = sample["mask"][0] > 0, torch.as_tensor(sample["image"])[0]
    if not mask.any() or mask.all():
        raise ValueError(f"sample {sample['meta']['index']}: no structure to describe")
    centre = torch.nonzero(mask)[:, 0].float().mean()
    attrs = {
        "side": "left" if centre < (mask.shape[0] - 1) / 2 else "right",
        "size": "large" if mask.float().mean() > LARGE_FRACTION else "small",
        "contrast": "bright" if image[mask].mean() > image[~mask].mean() else "dark",
    }
    return {**attrs, "text": f"a {attrs['size']} {attrs['contrast']} structure on the {attrs['side']}."}


def synthetic_report_set(n: int, out: str | os.PathLike, size: int = 32, seed: int = 0, dev_every: int = 4,
                         progress: bool = True) -> Path:
    """``n`` engine volumes (NIfTI) with templated reports: a manifest with ``image``, ``mask``, ``text``,
    the attributes and ``split`` (every ``dev_every``-th volume in ``dev``, the rest in ``train``)."""
    config = SynthConfig(spatial_dims=3, size=size, n_labels=2, kind="shapes")

    def describe(sample: dict) -> dict:
        split = "dev" if dev_every and sample["meta"]["index"] % dev_every == dev_every - 1 else "train"
        return {**describe_structure(sample), "split": split}

    return export_synthetic(config, n, out, seed=seed, progress=progress, describe=describe)
