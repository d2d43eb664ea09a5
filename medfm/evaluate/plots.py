"""Result figures as PNG: ROC curves, confusion matrices, segmentation overlays (mid-slice for volumes), grouped
bars (a model beside its baselines)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchmetrics.functional.classification as tmc

from medfm.figures import pyplot, save_figure


def roc_png(scores: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], path: str | Path,
            multi_label: bool = False, title: str = "") -> Path:
    """ROC curve per class (binary: the positive class; otherwise one-vs-rest), AUROC in the legend."""
    plt = pyplot()
    k = scores.shape[1]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    columns = [1] if (k == 2 and not multi_label) else range(k)
    for c in columns:
        y = (target[:, c] if multi_label else (target == c)).long()
        if y.min() == y.max():
            continue
        fpr, tpr, _ = tmc.binary_roc(scores[:, c].float(), y)
        auc = float(tmc.binary_auroc(scores[:, c].float(), y))
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{class_names[c]} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=100)


def confusion_png(pred: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], path: str | Path,
                  title: str = "") -> Path:
    """Confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    plt = pyplot()
    k = len(class_names)
    cm = tmc.multiclass_confusion_matrix(pred.long(), target.long(), num_classes=k).numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    return save_figure(fig, path, dpi=100)


def middle_slice(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W), first channel, as stored; (C, X, Y, Z) volume -> its middle slice along the last
    axis, as stored."""
    x = torch.as_tensor(x)[0]
    if x.ndim == 3:
        x = x[..., x.shape[-1] // 2]
    return x.float().cpu().numpy()


def _mid(x: torch.Tensor) -> np.ndarray:
    """:func:`middle_slice`, with a RAS volume's axial slice transposed so that it shows with
    ``origin='lower'`` (anterior up)."""
    a = middle_slice(x)
    return a.T if torch.as_tensor(x).ndim == 4 else a


def overlay_png(images: Sequence[torch.Tensor], preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor] | None,
                path: str | Path, num_classes: int, title: str = "") -> Path:
    """One row per sample: image, prediction overlay, ground-truth overlay (mid-slice for volumes)."""
    plt = pyplot()
    n = len(images)
    cols = 3 if targets is not None else 2
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.4 * n), squeeze=False)
    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    for i in range(n):
        img = _mid(images[i])
        origin = "lower" if torch.as_tensor(images[i]).ndim == 4 else "upper"
        panels = [("image", None), ("prediction", preds[i])] + ([("ground truth", targets[i])] if targets is not None else [])
        for j, (name, lab) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", origin=origin)
            if lab is not None:
                m = _mid(lab)
                ax.imshow(np.ma.masked_where(m == 0, m), cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1),
                          alpha=0.5, origin=origin, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def retrieval_png(metrics: dict, path: str | Path, title: str = "") -> Path:
    """Bars of recall@K, image->text and text->image, with the chance rate marked."""
    plt = pyplot()
    ks = list(metrics["chance"])
    x = np.arange(len(ks))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for j, (key, label) in enumerate((("image_to_text", "image -> text"), ("text_to_image", "text -> image"))):
        ax.bar(x + (j - 0.5) * 0.35, [metrics[key][k] for k in ks], 0.35, label=label)
    ax.scatter(x, [metrics["chance"][k] for k in ks], color="k", marker="_", s=400, label="chance", zorder=3)
    ax.set_xticks(x, ks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def grouped_bars_png(values: dict[str, dict[str, float]], path: str | Path, title: str = "", ylabel: str = "") -> Path:
    """Horizontal bars: one group per row of ``values`` (e.g. the model and each baseline), one bar per
    score inside it (e.g. closed and open accuracy), values written at the bar ends."""
    plt = pyplot()
    rows = list(values)
    keys = list(dict.fromkeys(k for v in values.values() for k in v))
    height = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows) * max(len(keys), 1) ** 0.5))
    y = np.arange(len(rows))
    for j, key in enumerate(keys):
        v = [values[r].get(key, np.nan) for r in rows]
        bars = ax.barh(y + (j - (len(keys) - 1) / 2) * height, v, height, label=key)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_yticks(y, rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(ylabel)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def _first_slice(x: torch.Tensor) -> np.ndarray:
    """First channel of a (C, H, W) image or the middle depth slice (first axis) of a (C, D, H, W) volume."""
    x = torch.as_tensor(x)[0]
    if x.ndim == 3:
        x = x[x.shape[0] // 2]
    return x.float().cpu().numpy()


def reconstruction_png(panels: dict[str, torch.Tensor], path: str | Path, title: str = "",
                       reference: str = "target") -> Path:
    """One row per sample, one column per entry of ``panels`` (e.g. MAE's masked input, reconstruction,
    target; (N, C, *spatial) each), every row on the grey scale of its ``reference`` image."""
    plt = pyplot()
    n = len(panels[reference])
    fig, axes = plt.subplots(n, len(panels), figsize=(2 * len(panels), 2 * n), squeeze=False)
    for i in range(n):
        ref = _first_slice(panels[reference][i])
        lo, hi = float(ref.min()), float(ref.max())
        for j, (key, images) in enumerate(panels.items()):
            ax = axes[i, j]
            ax.imshow(_first_slice(images[i]), cmap="gray", vmin=lo, vmax=hi)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(key)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)
