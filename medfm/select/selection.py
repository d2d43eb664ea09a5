"""``medfm select``: the items of an unlabelled pool to label next, as a manifest.

The pool is one split of a manifest, an npz or a folder. Rounds: ``labelled`` is a CSV of what is labelled
already (an earlier ``selected.csv`` with its ``position`` column, or any manifest whose image paths are in the
pool); its items are never picked again and count as covered. The strategies that need a model (entropy,
margin, BADGE) use a logistic-regression probe fitted on the labelled items' embeddings and labels.

Writes ``OUT/selected.csv`` (``position`` in the split, ``source`` and, for a manifest, the row's own columns
with absolute paths; for an npz its stored label), ``OUT/selection.json`` and ``OUT/selection.png`` (the pool's
embeddings in 2D, UMAP when umap-learn is installed, else PCA, with the labelled items and the picks marked).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from medfm.atomic import atomic_path, write_text
from medfm.data import DataError, read_rows
from medfm.figures import pyplot, save_figure

from .embeddings import CACHE_DIR, Embedder, embed
from .strategies import NEEDS_MODEL, STRATEGIES, normalise, select


def absolute_paths(out: dict, row: dict, root: Path) -> dict:
    """``row``'s cells into ``out``, its ``image`` / ``mask`` paths that resolve against the manifest's folder
    ``root`` made absolute (so the rows can be written anywhere)."""
    out.update(row)
    for key in ("image", "mask"):
        value = str(row.get(key) or "")
        if value and not Path(value).is_absolute() and (root / value).exists():
            out[key] = os.path.abspath(root / value)
    return out


def pool_rows(dataset) -> list[dict]:
    """One dict per pool item: ``position``, ``source`` and, for a manifest, its row with paths made absolute;
    for an npz, its stored ``label``."""
    rows = []
    manifest = getattr(dataset, "manifest", None)
    by_line = {n: r for n, r in read_rows(manifest)} if manifest else {}
    root = Path(manifest).parent if manifest else Path(".")
    for i in range(len(dataset)):
        row = {"position": i, "source": dataset.describe(i)}
        if manifest:
            rec = dataset.records[i]
            absolute_paths(row, by_line[rec.line], root)
        elif hasattr(dataset, "paths"):
            row["image"] = str(dataset.paths[i])
        elif getattr(dataset, "labels", None) is not None:
            row["label"] = int(dataset.targets[i]) if dataset.targets.ndim == 1 else ""
        rows.append(row)
    return rows


def labelled_positions(path: str | os.PathLike, rows: list[dict], label: str | None) -> tuple[list[int], list]:
    """Pool positions and labels (None where the file has none) of the items a labelled CSV names: by its
    ``position`` column, or by image path for a plain manifest. An item not in the pool is an error naming its line."""
    by_image = {os.path.realpath(r["image"]): r["position"] for r in rows if r.get("image")}
    positions, labels = [], []
    root = Path(path).parent
    for line, r in read_rows(path):
        if "position" in r and str(r["position"]).strip() != "":
            try:
                pos = int(r["position"])
            except ValueError:
                raise DataError(f"{path} line {line}: position {r['position']!r} is not a whole number") from None
            if not 0 <= pos < len(rows):
                raise DataError(f"{path} line {line}: position {pos} is outside the pool (0..{len(rows) - 1})")
        elif r.get("image"):
            img = Path(str(r["image"]))
            pos = by_image.get(os.path.realpath(img if img.is_absolute() else root / img))
            if pos is None:
                raise DataError(f"{path} line {line}: image {r['image']} is not in the pool")
        else:
            raise DataError(f"{path} line {line}: needs a 'position' or an 'image' column")
        positions.append(pos)
        value = r.get(label or "label")
        labels.append(None if value in (None, "") else str(value))
    return positions, labels


def probe_probabilities(x: np.ndarray, positions: Sequence[int], labels: Sequence[str]) -> np.ndarray:
    """Class probabilities of every item from a logistic regression fitted on the labelled ones (the "model"
    of the uncertainty strategies)."""
    from sklearn.linear_model import LogisticRegression

    known = [(p, y) for p, y in zip(positions, labels) if y is not None]
    if len({y for _, y in known}) < 2:
        raise ValueError("the uncertainty strategies need labelled items of at least two classes (a label column "
                         "in --labelled); start with a cold-start strategy")
    xs = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    clf = LogisticRegression(max_iter=1000).fit(xs[[p for p, _ in known]], [y for _, y in known])
    return clf.predict_proba(xs)


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2D coordinates of the embeddings: UMAP when umap-learn is installed, else PCA."""
    try:
        import umap  # noqa: F401 - optional

        return umap.UMAP(random_state=seed).fit_transform(x), "UMAP"
    except ImportError:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x), "PCA"


def selection_plot(x: np.ndarray, picks: Sequence[int], labelled: Sequence[int], path: Path, title: str,
                   seed: int = 0, classes: np.ndarray | None = None) -> Path:
    """The pool in 2D (coloured by class when known), labelled items as squares, picks as red stars."""
    xy, how = project_2d(normalise(x), seed)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    if classes is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, c="0.6", alpha=0.5, linewidths=0, label="pool")
    else:  # the labels the pool file stores (an npz's): shown, never read by the strategies
        for k in np.unique(classes):
            ax.scatter(xy[classes == k, 0], xy[classes == k, 1], s=6, alpha=0.4, linewidths=0, label=f"class {k}")
    if len(labelled):
        ax.scatter(xy[labelled, 0], xy[labelled, 1], s=40, marker="s", facecolors="none", edgecolors="tab:blue",
                   label=f"labelled ({len(labelled)})")
    ax.scatter(xy[picks, 0], xy[picks, 1], s=120, marker="*", c="tab:red", edgecolors="k", linewidths=0.5,
               label=f"picked ({len(picks)})")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{how} 1")
    ax.set_ylabel(f"{how} 2")
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path, dpi=110)


def write_rows(path: Path, rows: list[dict]) -> Path:
    """A CSV of ``rows`` (the union of their keys as columns, in the order first seen), atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


def run_selection(embedder: Embedder, data: str, out: str | os.PathLike, budget: int, strategy: str = "typiclust",
                  split: str | None = "train", labelled: str | None = None, label: str | None = None, seed: int = 0,
                  cache: str | os.PathLike | None = CACHE_DIR, progress: bool = True,
                  n_classes: int | None = None) -> dict:
    """Embed the pool (cached), pick ``budget`` items by ``strategy`` and write the selection (module doc);
    ``n_classes``: the number of classes when known (else that of the labelled items, if any)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; strategies: {', '.join(STRATEGIES)}")
    t0 = time.perf_counter()
    dataset, x, stored = embed(embedder, data, split, cache=cache, progress=progress)
    rows = pool_rows(dataset)
    have, have_labels = labelled_positions(labelled, rows, label) if labelled else ([], [])
    probs = probe_probabilities(x, have, have_labels) if strategy in NEEDS_MODEL else None
    known = {y for y in have_labels if y is not None}
    picks = select(strategy, x, budget, have, seed=seed, probs=probs,
                   n_classes=n_classes or (len(known) if len(known) > 1 else None))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "selected.csv", [{**rows[i], "strategy": strategy} for i in picks])
    classes = stored if stored is not None else None
    selection_plot(x, picks, have, out / "selection.png", f"{strategy}: {budget} picks from {len(rows)} "
                   f"({embedder.name})", seed, classes)
    summary = {"strategy": strategy, "budget": budget, "seed": seed, "data": str(data), "split": split,
               "encoder": embedder.name, "encoder_hash": embedder.identity, "preprocess": embedder.preprocess.record(),
               "pool": len(rows), "labelled": len(have), "positions": picks,
               "wall_s": round(time.perf_counter() - t0, 2)}
    write_text(out / "selection.json", json.dumps(summary, indent=2) + "\n")
    return summary
