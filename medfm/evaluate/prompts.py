"""Prompts simulated from ground-truth masks, as promptable segmenters (SAM, MedSAM, SAM-Med2D) are trained and
evaluated: a box around the object with MedSAM's random jitter, and interactive clicks, each from the larger error
of the current prediction (a positive click in the missed object, a negative one in a false detection), placed
by MONAI deepgrow's rule (a voxel drawn with probability growing with its distance from the error region's
border, ``AddRandomGuidanced``), as SAM-Med2D / SAM-Med3D simulate their interactive rounds.

:func:`prompted_scores` runs one image through a box and 1..N click rounds and returns Dice and NSD (MONAI's
normalised surface Dice) after each; coordinates are (x, y) in the image's pixels, as ``medfm segment`` takes them.
"""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.apps.deepgrow.transforms import AddRandomGuidanced
from monai.metrics import compute_surface_dice

from medfm.atomic import write_text
from medfm.figures import pyplot, save_figure


def box_from_mask(mask: np.ndarray, jitter: int = 0, rng: np.random.Generator | None = None) -> list[float] | None:
    """The bounding box (x0, y0, x1, y1) of a 2D mask's foreground, each side moved outward by a random 0..``jitter``
    pixels (MedSAM trains with 0-20) and kept inside the image; None for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask) > 0)
    if not len(xs):
        return None
    h, w = np.asarray(mask).shape
    r = (rng or np.random.default_rng()).integers(0, jitter + 1, 4) if jitter else np.zeros(4, int)
    return [float(max(0, xs.min() - r[0])), float(max(0, ys.min() - r[1])), float(min(w - 1, xs.max() + r[2])),
            float(min(h - 1, ys.max() + r[3]))]


def next_voxel_click(pred: np.ndarray, truth: np.ndarray, seed: int = 0) -> tuple[tuple[int, ...], int] | None:
    """The next simulated click on a 2D or 3D prediction, as (array index, label): in the missed object (label 1)
    when it is larger than the false detection, else in the false detection (label 0); drawn by MONAI deepgrow's
    ``AddRandomGuidanced`` (probability exp(distance to the region's border) - 1). None when nothing is wrong."""
    truth, pred = np.asarray(truth) > 0, np.asarray(pred) > 0
    missed, false = (truth & ~pred).astype(np.float32), (pred & ~truth).astype(np.float32)
    if not missed.any() and not false.any():
        return None
    pick = AddRandomGuidanced(guidance="guidance", discrepancy="discrepancy", probability="probability")
    pick.set_random_state(seed)
    out = pick({"guidance": json.dumps([[], []]), "discrepancy": [missed[None], false[None]], "probability": 1.0})
    pos, neg = json.loads(out["guidance"])
    label = 1 if pos and pos[0][0] != -1 else 0
    return tuple(int(v) for v in (pos if label else neg)[0][1:]), label  # deepgrow writes (channel, *index)


def next_click(pred: np.ndarray, truth: np.ndarray, seed: int = 0) -> tuple[float, float, int] | None:
    """:func:`next_voxel_click` on a 2D image as (x, y, label), the way prompts are given in an image's pixels."""
    click = next_voxel_click(pred, truth, seed)
    if click is None:
        return None
    (y, x), label = click
    return float(x), float(y), label


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks (1 when both are empty)."""
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def nsd(pred: np.ndarray, truth: np.ndarray, tolerance: float = 2.0) -> float:
    """Normalised surface Dice at ``tolerance`` pixels (MONAI's ``compute_surface_dice``), 2D or 3D binary masks."""
    p = torch.as_tensor(np.asarray(pred) > 0)
    t = torch.as_tensor(np.asarray(truth) > 0)
    if not p.any() and not t.any():
        return 1.0
    if not p.any() or not t.any():
        return 0.0
    onehot = lambda m: torch.stack([~m, m])[None].float()  # noqa: E731  (1, 2, *spatial)
    with warnings.catch_warnings():  # MONAI warns about an argument of its own internals
        warnings.simplefilter("ignore", FutureWarning)
        return float(compute_surface_dice(onehot(p), onehot(t), class_thresholds=[tolerance]).item())


def prompted_scores(predict: Callable[..., dict], image: np.ndarray, truth: np.ndarray,
                    clicks: Sequence[int] = (1, 3, 5, 10), jitter: int = 5, seed: int = 0) -> dict:
    """Dice and NSD of one object from a jittered ground-truth box (``box``) and after each number of interactive
    clicks in ``clicks`` (``click_k``); ``shown``: the box, the clicks and the masks after the box and after the
    last click (for :func:`prompted_page`). ``predict(image, box=..., points=..., labels=..., mask=...)`` is a
    promptable model's :meth:`~medfm.heads.promptable.PromptableSAM.predict`: each click round gives it every click
    so far and the previous round's logits, as SAM-Med2D's interactive training does."""
    rng = np.random.default_rng(seed)
    out = {}
    box = box_from_mask(truth, jitter, rng)
    if box is None:
        raise ValueError("an empty mask has no object to prompt for")
    res = predict(image, box=box)
    box_mask = res["masks"][0].numpy()
    out["box"] = {"dice": dice(box_mask, truth), "nsd": nsd(box_mask, truth)}
    pred, logits, points, labels = np.zeros_like(truth, bool), None, [], []
    for k in range(1, max(clicks, default=0) + 1):
        click = next_click(pred, truth, seed=seed * 1000 + k)
        if click is not None:
            points.append(list(click[:2]))
            labels.append(click[2])
            res = predict(image, points=points, labels=labels, mask=logits)
            pred, logits = res["masks"][0].numpy(), res["logits"][:1]
        if k in clicks:
            out[f"click_{k}"] = {"dice": dice(pred, truth), "nsd": nsd(pred, truth)}
    out["shown"] = {"box": box, "box_mask": box_mask, "points": points, "labels": labels, "click_mask": pred}
    return out


def click_scores(predict: Callable[[list, list], np.ndarray], truth: np.ndarray,
                 clicks: Sequence[int] = (1, 3, 5, 10), seed: int = 0) -> dict:
    """Dice and NSD of one object (2D or 3D) after each number of clicks in ``clicks``, for a model prompted by
    clicks alone (the native 3D model): the first click lands in the object, each next one in the larger error
    (:func:`next_voxel_click`); ``predict(points, labels)`` gets every click so far as array indices and returns
    the binary mask. ``shown``: the clicks, the masks after the first and the last."""
    out: dict = {}
    pred, points, labels, first = np.zeros_like(truth, bool), [], [], None
    if not np.asarray(truth).any():
        raise ValueError("an empty mask has no object to prompt for")
    for k in range(1, max(clicks, default=0) + 1):
        click = next_voxel_click(pred, truth, seed=seed * 1000 + k)
        if click is not None:
            points.append(list(click[0]))
            labels.append(click[1])
            pred = np.asarray(predict(points, labels)) > 0
        first = pred if first is None else first
        if k in clicks:
            out[f"click_{k}"] = {"dice": dice(pred, truth), "nsd": nsd(pred, truth)}
    out["shown"] = {"points": points, "labels": labels, "first_mask": first, "click_mask": pred}
    return out


def prompted_page(shown: Sequence[dict], metrics: dict, path: str | Path, title: str = "") -> Path:
    """An HTML page of promptable segmentation results: the metrics as a table, then one row of overlays per
    object (``shown``: ``image``, ``truth``, ``name``, ``scores`` and :func:`prompted_scores`' ``shown``: the box
    and its mask, the clicks and the mask after the last), drawn into ``<page>_overlays.png`` beside it."""
    path = Path(path)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else
                   f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in metrics.items())
    figure = ""
    if shown:
        png = path.with_name(path.stem + "_overlays.png")
        _overlays(shown, png)
        figure = f'<img src="{png.name}" alt="overlays">'
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
                    f"<h2>{html.escape(title)}</h2><table border='1' cellpadding='3'>{rows}</table>"
                    f"<p>Rows: one object each. Columns: the image with the ground truth (green) and the jittered "
                    f"box; the mask from the box; the mask after the last simulated click (+ foreground, x "
                    f"background clicks).</p>{figure}</body></html>")
    return path


def _overlays(shown: Sequence[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(shown), 3, figsize=(7.2, 2.4 * len(shown)), squeeze=False)
    for row, item in zip(axes, shown):
        img = np.asarray(item["image"], dtype=np.float32)
        img = img.mean(-1) if img.ndim == 3 else img
        last = max((int(k.split("_")[1]) for k in item["scores"] if k.startswith("click_") and k.endswith("_dice")),
                   default=0)  # the largest click count scored (0: none)
        boxed = item.get("box") is not None  # a clicks-only model (3D) shows its first click's mask instead
        panels = [("ground truth, box" if boxed else "ground truth", item["truth"]),
                  (f"box: Dice {item['scores']['box_dice']:.2f}", item["box_mask"]) if boxed else
                  (f"1 click: Dice {item['scores']['click_1_dice']:.2f}", item["first_mask"])]
        if last:
            panels.append((f"{last} clicks: Dice {item['scores'][f'click_{last}_dice']:.2f}", item["click_mask"]))
        for ax, (name, mask) in zip(row, panels):
            ax.imshow(img, cmap="gray")
            m = np.asarray(mask) > 0
            ax.imshow(np.ma.masked_where(~m, m), cmap="summer" if ax is row[0] else "autumn", alpha=0.45,
                      interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.set_axis_off()
        if boxed:
            x0, y0, x1, y1 = item["box"]
            row[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1))
        for (x, y), lab in zip(item["points"], item["labels"]):
            row[2].plot(x, y, "+" if lab else "x", color="cyan" if lab else "red", markersize=7, mew=1.5)
        row[0].text(2, 2, item["name"], color="white", fontsize=6, va="top")
    save_figure(fig, path, dpi=90)
