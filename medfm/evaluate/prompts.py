"""Prompts simulated from ground-truth masks, as promptable segmenters (SAM, MedSAM, SAM-Med2D) are trained and
evaluated: a box around the object with MedSAM's random jitter, and interactive clicks, each from the larger error
of the current prediction (a positive click in the missed object, a negative one in a false detection), placed
by MONAI deepgrow's rule (a voxel drawn with probability growing with its distance from the error region's
border, ``AddRandomGuidanced``), as SAM-Med2D / SAM-Med3D simulate their interactive rounds.

:func:`prompted_scores` runs one image through a box and 1..N click rounds and returns Dice and NSD (MONAI's
normalised surface Dice) after each; coordinates are (x, y) in the image's pixels, as ``medfm segment`` takes them.
"""

from __future__ import annotations

import json
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from monai.apps.deepgrow.transforms import AddRandomGuidanced
from monai.metrics import compute_surface_dice


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


def next_click(pred: np.ndarray, truth: np.ndarray, seed: int = 0) -> tuple[float, float, int] | None:
    """The next simulated click (x, y, label) on a 2D prediction: in the missed object (label 1) when it is larger
    than the false detection, else in the false detection (label 0); drawn by MONAI deepgrow's
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
    _, y, x = (pos if label else neg)[0]  # deepgrow writes (distance, row, column)
    return float(x), float(y), label


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks (1 when both are empty)."""
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def nsd(pred: np.ndarray, truth: np.ndarray, tolerance: float = 2.0) -> float:
    """Normalised surface Dice at ``tolerance`` pixels (MONAI's ``compute_surface_dice``), 2D binary masks."""
    p = torch.as_tensor(np.asarray(pred) > 0)
    t = torch.as_tensor(np.asarray(truth) > 0)
    if not p.any() and not t.any():
        return 1.0
    if not p.any() or not t.any():
        return 0.0
    onehot = lambda m: torch.stack([~m, m])[None].float()  # noqa: E731  (1, 2, H, W)
    with warnings.catch_warnings():  # MONAI warns about an argument of its own internals
        warnings.simplefilter("ignore", FutureWarning)
        return float(compute_surface_dice(onehot(p), onehot(t), class_thresholds=[tolerance]).item())


def prompted_scores(predict: Callable[..., dict], image: np.ndarray, truth: np.ndarray,
                    clicks: Sequence[int] = (1, 3, 5, 10), jitter: int = 5, seed: int = 0) -> dict:
    """Dice and NSD of one object from a jittered ground-truth box (``box``) and after each number of interactive
    clicks in ``clicks`` (``click_k``). ``predict(image, box=..., points=..., labels=..., mask=...)`` is a
    promptable model's :meth:`~medfm.heads.promptable.PromptableSAM.predict`: each click round gives it every click
    so far and the previous round's logits, as SAM-Med2D's interactive training does."""
    rng = np.random.default_rng(seed)
    out = {}
    box = box_from_mask(truth, jitter, rng)
    if box is None:
        raise ValueError("an empty mask has no object to prompt for")
    res = predict(image, box=box)
    out["box"] = {"dice": dice(res["masks"][0], truth), "nsd": nsd(res["masks"][0], truth)}
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
    return out
