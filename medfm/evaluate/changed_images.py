"""Image-sensitivity tests: the same evaluation set with only its images changed (blank or shuffled), and the
share of outputs that change. A model whose answers or reports read the image changes them; one that writes
from the text prior alone (a question-only model, a collapsed report generator) does not.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset


class ChangedImages(Dataset):
    """``ds`` with only its images changed, for image-sensitivity tests: ``"blank"`` (a constant zero image of
    the same shape) or ``"shuffled"`` (each item gets the image of another one: a seeded derangement of the
    distinct images ``keys``, default one per item, so that no item keeps its own image). Everything else
    (question, answer, text, masks) is the original item's."""

    def __init__(self, ds, mode: str, keys: Sequence[str] | None = None, seed: int = 0):
        if mode not in ("blank", "shuffled"):
            raise ValueError(f"mode must be 'blank' or 'shuffled', got {mode!r}")
        self.ds, self.mode = ds, mode
        keys = [str(k) for k in (keys if keys is not None else range(len(ds)))]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        order = sorted(first)
        random.Random(seed).shuffle(order)
        nxt = {k: order[(j + 1) % len(order)] for j, k in enumerate(order)}  # a cycle: nobody keeps their own
        self.source = [first[nxt[k]] for k in keys]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.ds[i])
        if self.mode == "blank":
            item["image"] = torch.zeros_like(torch.as_tensor(item["image"]))
        else:
            item["image"] = self.ds[self.source[i]]["image"]
        return item


def changed_share(outputs: Sequence[str], changed: Sequence[str], normalise: Callable[[str], str] = str.strip) -> float:
    """Share of items whose (normalised) output differs between the real image and a changed one."""
    if len(outputs) != len(changed) or not outputs:
        raise ValueError(f"image sensitivity needs two equally long, non-empty output lists ({len(outputs)}, "
                         f"{len(changed)})")
    return sum(normalise(a) != normalise(b) for a, b in zip(outputs, changed)) / len(outputs)
