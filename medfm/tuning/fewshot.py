"""Few-shot subsets: ``K`` labelled examples per class, drawn with a seed."""

from __future__ import annotations

import numpy as np


def few_shot_indices(labels, shots: int, seed: int = 0) -> list[int]:
    """Indices of ``shots`` examples per class (all of a class if it has fewer), sorted.

    ``labels``: (N,) class indices, or (N, K) multi-hot vectors (then ``shots``
    positives per class, drawn greedily so that examples shared by classes count for each).
    """
    y = np.asarray(labels)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    if y.ndim == 1:
        picked = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
        return sorted(int(i) for i in np.concatenate(picked))
    chosen: set[int] = set()
    for c in range(y.shape[1]):
        have = sum(1 for i in chosen if y[i, c] > 0)
        for i in rng.permutation(np.flatnonzero(y[:, c] > 0)):
            if have >= shots:
                break
            if int(i) not in chosen:
                chosen.add(int(i))
                have += 1
    return sorted(chosen)


def selected_positions(path, pool_size: int) -> list[int]:
    """The training-split positions a ``medfm select`` output (``selected.csv``, column ``position``) names,
    sorted; a missing column, a non-integer or a position outside the split is an error naming the line."""
    from medfm.data import DataError, read_rows

    out = []
    for line, row in read_rows(path):
        value = str(row.get("position", "")).strip()
        if not value:
            raise DataError(f"{path} line {line}: no 'position' (a `medfm select` selected.csv names the "
                            "training-split position of each item)")
        try:
            pos = int(value)
        except ValueError:
            raise DataError(f"{path} line {line}: position {value!r} is not a whole number") from None
        if not 0 <= pos < pool_size:
            raise DataError(f"{path} line {line}: position {pos} is outside the training split (0..{pool_size - 1})")
        out.append(pos)
    return sorted(set(out))
