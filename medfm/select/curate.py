"""``medfm curate``: what is wrong with a data set before anything trains on it.

Reads every split of a manifest, npz or folder and reports:

* **duplicates**: exact pixel copies, perceptual-hash neighbours and embedding neighbours
  (:mod:`medfm.select.duplicates`), and one file listed in several rows;
* **leaks**: any of those pairs across two splits, and a ``patient`` column value found in two splits;
* **label conflicts**: duplicate pairs whose labels differ;
* **outliers**: items far from everything else (mean distance to their 5 nearest neighbours in embedding
  space more than ``OUTLIER_Z`` robust standard deviations above the median);
* on request, a **cluster-balanced subset** for pretraining (hierarchical k-means as in DINOv2's data
  curation, Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning": k-means on the items, then
  on the centres; the subset takes an equal share of each top cluster, and within it of each sub-cluster).

Writes ``OUT/findings.csv`` (one row per finding, both rows named), ``OUT/summary.json`` (counts and the
thresholds), ``OUT/report.html`` (the findings with the two images side by side) and, with ``clean``, a cleaned
copy (``OUT/clean.csv`` for a manifest, ``OUT/clean.npz`` for an npz: later copies within a split and the
held-out side of every leak dropped). The input is never changed.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.atomic import atomic_path, write_text
from medfm.data import DataError, open_dataset, read_rows, split_names
from medfm.progress import progress_bar

from .duplicates import (COSINE, HASH_DISTANCE, LOOKALIKE_CORRELATION, PIXEL_CORRELATION, as_uint8, embedding_pairs,
                         exact_key, exact_pairs, hash_pairs, perceptual_hash, thumbnail_vector)
from .strategies import normalise
from .embeddings import CACHE_DIR, Embedder, embed
from .selection import absolute_paths, write_rows

OUTLIER_Z = 5.0
TRAIN = "train"
KINDS = ("duplicate", "leak", "patient_leak", "label_conflict", "outlier", "same_file")
FINDING_COLUMNS = ["kind", "detail", "split_a", "row_a", "source_a", "file_a", "label_a", "split_b", "row_b", "source_b",
                   "file_b", "label_b"]


@dataclass
class Item:
    split: str
    position: int
    source: str
    line: int | None
    label: str = ""
    patient: str = ""
    file: str = ""


@dataclass
class Curation:
    """Everything ``medfm curate`` found (positions index :attr:`items`)."""

    items: list[Item]
    findings: list[dict] = field(default_factory=list)
    balanced: list[int] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f["kind"] == kind)


def _splits(path: str) -> list[str | None]:
    names = split_names(path)
    return names or [None]


def _open(path: str, split: str | None, transform=None):
    with warnings.catch_warnings():  # repeated images are a finding here, not a warning
        warnings.simplefilter("ignore")
        return open_dataset(path, split=split, transform=transform)


def read_items(path: str, label: str | None, patient: str | None, progress: bool = True
               ) -> tuple[list[Item], list[str], list[int], np.ndarray, dict]:
    """Every item of every split with its exact key, perceptual hash and 32 px thumbnail; the datasets by split."""
    items, keys, hashes, thumbs, datasets = [], [], [], [], {}
    manifest = str(path).lower().endswith((".csv", ".tsv", ".jsonl"))
    by_line = {n: r for n, r in read_rows(path)} if manifest else {}
    for split in _splits(path):
        ds = _open(path, split)
        datasets[split] = ds
        targets = getattr(ds, "targets", None)
        for i in progress_bar(range(len(ds)), desc=f"hashing {split or 'all'}", disable=not progress, unit="image"):
            sample = ds.load_sample(i)
            rec = ds.records[i] if manifest else None
            row = by_line.get(rec.line, {}) if rec else {}
            lab = str(row.get(label, "")) if label else (str(int(targets[i])) if targets is not None
                                                       and np.ndim(targets) == 1 else "")
            items.append(Item(str(split or ""), i, ds.describe(i), rec.line if rec else None, lab,
                              str(row.get(patient, "")) if patient else "",
                              rec.image if rec else str(getattr(ds, "paths", [""] * (i + 1))[i])))
            keys.append(exact_key(sample["image"]))
            hashes.append(perceptual_hash(sample["image"]))
            thumbs.append(thumbnail_vector(sample["image"]))
    return items, keys, hashes, np.stack(thumbs), datasets


def _finding(kind: str, detail: str, a: Item, b: Item | None = None) -> dict:
    """One finding; each item named twice: where it is listed (``source``: "busi.csv line 2") and the image
    file a user opens or removes (``file``)."""
    f = {"kind": kind, "detail": detail, "split_a": a.split, "row_a": a.line if a.line is not None else a.position,
         "source_a": a.source, "file_a": a.file, "label_a": a.label}
    if b is not None:
        f.update(split_b=b.split, row_b=b.line if b.line is not None else b.position, source_b=b.source,
                 file_b=b.file, label_b=b.label)
    return f


def pair_findings(items: list[Item], pairs: dict[tuple[int, int], str]) -> list[dict]:
    """A duplicate, leak and/or label-conflict finding per pair (``pairs``: (i, j) -> how they match); one file
    in two rows of one split is ``same_file`` (several questions on one image: a fact, not a fault)."""
    out = []
    for (i, j), how in sorted(pairs.items()):
        a, b = items[i], items[j]
        kind = "leak" if a.split != b.split else "same_file" if how == "same file" else "duplicate"
        out.append(_finding(kind, how, a, b))
        if a.label and b.label and a.label != b.label:
            out.append(_finding("label_conflict", how, a, b))
    return out


def patient_leaks(items: list[Item]) -> list[dict]:
    """One finding per patient value seen in more than one split (its first row in each)."""
    first: dict[str, dict[str, Item]] = {}
    for it in items:
        if it.patient:
            first.setdefault(it.patient, {}).setdefault(it.split, it)
    out = []
    for patient, where in first.items():
        splits = list(where.values())
        for other in splits[1:]:
            out.append(_finding("patient_leak", f"patient {patient}", splits[0], other))
    return out


def outliers(x: np.ndarray, k: int = 5, z: float = OUTLIER_Z) -> list[tuple[int, float]]:
    """(position, robust z) of items whose mean distance to their ``k`` nearest neighbours (centred
    embeddings) is more than ``z`` robust standard deviations (1.4826 MAD) above the median."""
    from sklearn.neighbors import NearestNeighbors

    if len(x) <= k + 1:
        return []
    c = normalise(x)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(c).kneighbors(c)
    score = dist[:, 1:].mean(1)
    med = np.median(score)
    mad = 1.4826 * np.median(np.abs(score - med)) + 1e-12
    zs = (score - med) / mad
    return [(int(i), float(zs[i])) for i in np.flatnonzero(zs > z)]


def balanced_subset(x: np.ndarray, size: int, seed: int = 0) -> list[int]:
    """``size`` positions spread evenly over a two-level hierarchical k-means of the embeddings (module doc):
    an equal share per top cluster (a small cluster gives all it has, the rest goes to the others), the same
    within each top cluster over its sub-clusters, and in each sub-cluster the items nearest its centre."""
    from sklearn.cluster import KMeans

    if not 0 < size <= len(x):
        raise ValueError(f"balanced subset size must be in 1..{len(x)}, got {size}")
    z = normalise(x)
    k1 = int(min(len(x), max(2, round(np.sqrt(len(x)) * 2))))
    low = KMeans(n_clusters=k1, n_init=3, random_state=seed).fit(z)
    k2 = int(max(2, round(np.sqrt(k1))))
    top = KMeans(n_clusters=min(k2, k1), n_init=3, random_state=seed).fit(low.cluster_centers_)
    dist = np.linalg.norm(z - low.cluster_centers_[low.labels_], axis=1)
    members = {c: list(np.flatnonzero(low.labels_ == c)[np.argsort(dist[low.labels_ == c])]) for c in range(k1)}

    def share(groups: list[list[int]], n: int) -> list[int]:
        """n items taken round-robin from ``groups`` (each already ordered): equal shares, water-filled."""
        out, queues = [], [list(g) for g in groups if g]
        while len(out) < n and queues:
            for q in list(queues):
                if len(out) == n:
                    break
                out.append(q.pop(0))
                if not q:
                    queues.remove(q)
        return out

    groups = []
    for t in range(top.n_clusters):
        subs = [members[c] for c in np.flatnonzero(top.labels_ == t)]
        groups.append(share(subs, sum(len(s) for s in subs)))  # the top cluster's items, sub-clusters interleaved
    return sorted(int(i) for i in share(groups, size))


def curate(path: str, embedder: Embedder | None, label: str | None = None, patient: str | None = None,
           hash_distance: int = HASH_DISTANCE, cosine: float = COSINE, balanced: int | None = None, seed: int = 0,
           cache: str | os.PathLike | None = CACHE_DIR, progress: bool = True) -> Curation:
    """Find duplicates, leaks, conflicts and outliers in every split of ``path`` (module doc); ``embedder``
    None skips the embedding-based checks (pixel hashes only)."""
    items, keys, hashes, thumbs, datasets = read_items(path, label, patient, progress)
    if not items:
        raise DataError(f"{path}: no items")
    pairs: dict[tuple[int, int], str] = {}
    files: dict[str, int] = {}
    for j, it in enumerate(items):  # the same file in several rows (several questions on one image, or a leak)
        i = files.setdefault(os.path.realpath(it.file), j) if it.file else j
        if i != j:
            pairs[(i, j)] = "same file"
    # the content checks compare each file once: rows that repeat a file would pair with everything it pairs with
    unique = np.array(sorted(set(files.values()) | {j for j, it in enumerate(items) if not it.file}))
    for a, b in exact_pairs([keys[i] for i in unique]):
        pairs.setdefault((unique[a], unique[b]), "identical pixels")
    thumbs = thumbs[unique]
    for a, b, d in hash_pairs([hashes[i] for i in unique], hash_distance, thumbnails=thumbs):
        pairs.setdefault((unique[a], unique[b]), f"pHash {d} bits, pixel correlation {float(thumbs[a] @ thumbs[b]):.3f}")
    x = None
    found_outliers: list[tuple[int, float]] = []
    if embedder is not None:
        with warnings.catch_warnings():  # repeated images are a finding here, not a warning
            warnings.simplefilter("ignore")
            x = np.concatenate([embed(embedder, path, split, cache=cache, progress=progress)[1] for split in datasets])
        x = x[unique]
        for a, b, c in embedding_pairs(x, cosine, thumbnails=thumbs):
            pairs.setdefault((unique[a], unique[b]), f"cosine {c:.3f}, pixel correlation {float(thumbs[a] @ thumbs[b]):.3f}")
        found_outliers = [(int(unique[a]), z) for a, z in outliers(x)]
    result = Curation(items, thresholds={"hash_distance": hash_distance, "pixel_correlation": PIXEL_CORRELATION,
                                       "cosine": cosine, "lookalike_correlation": LOOKALIKE_CORRELATION, "outlier_z": OUTLIER_Z})
    result.findings = pair_findings(items, pairs) + patient_leaks(items)
    result.findings += [_finding("outlier", f"robust z {zs:.1f}", items[i]) for i, zs in found_outliers]
    if balanced:
        if x is None:
            raise ValueError("a balanced subset needs embeddings (an encoder)")
        result.balanced = [int(unique[a]) for a in balanced_subset(x, balanced, seed)]
    return result


def dropped(result: Curation) -> set[int]:
    """Positions a cleaned copy leaves out: the later item of a duplicate pair within a split, and the item of
    a leak pair that is not in the training split (the later split's when neither is)."""
    index = {(it.split, it.line if it.line is not None else it.position): n for n, it in enumerate(result.items)}
    out = set()
    for f in result.findings:
        if f["kind"] not in ("duplicate", "leak"):
            continue
        a, b = index[(f["split_a"], f["row_a"])], index[(f["split_b"], f["row_b"])]
        if f["kind"] == "leak" and result.items[b].split == TRAIN:
            a, b = b, a
        out.add(b)
    return out


def write_clean(path: str, result: Curation, out: Path) -> Path:
    """The input minus :func:`dropped`: a manifest's rows (``clean.csv``) or an npz's arrays (``clean.npz``)."""
    drop = dropped(result)
    if str(path).lower().endswith(".npz"):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        for split in {it.split for it in result.items}:
            gone = sorted(it.position for n, it in enumerate(result.items) if n in drop and it.split == split)
            for kind in ("images", "labels"):
                if f"{split}_{kind}" in arrays:
                    arrays[f"{split}_{kind}"] = np.delete(arrays[f"{split}_{kind}"], gone, axis=0)
        target = out / "clean.npz"
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return target
    if not str(path).lower().endswith((".csv", ".tsv", ".jsonl")):
        raise ValueError(f"{path}: a cleaned copy is written for manifests and npz files")
    gone = {result.items[n].line for n in drop}
    root = Path(path).parent
    return write_rows(out / "clean.csv", [absolute_paths({}, r, root) for n, r in read_rows(path) if n not in gone])


def _thumbnail(dataset, position: int, size: int = 112) -> str:
    """A data: URI of a small PNG of one item (middle slice of a volume)."""
    from PIL import Image

    im = Image.fromarray(as_uint8(dataset.load_sample(position)["image"]))
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_report(path: str, result: Curation, out: Path, max_per_kind: int = 40) -> dict:
    """``findings.csv``, ``summary.json`` and ``report.html`` (up to ``max_per_kind`` findings of each kind
    shown with their images)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "findings.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FINDING_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(result.findings)
    kinds = list(KINDS)
    per_split: dict[str, int] = {}
    for it in result.items:
        per_split[it.split or "all"] = per_split.get(it.split or "all", 0) + 1
    summary = {"data": str(path), "items": len(result.items), "splits": per_split,
               **{k: result.count(k) for k in kinds}, "thresholds": result.thresholds,
               "balanced_subset": len(result.balanced)}
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    datasets = {split: _open(path, split or None) for split in {it.split for it in result.items}}
    index = {(it.split, it.line if it.line is not None else it.position): it for it in result.items}
    parts = [f"<html><head><meta charset='utf-8'><title>medfm curate: {html.escape(str(path))}</title>"
             "<style>body{font-family:sans-serif;font-size:13px} td{padding:4px;vertical-align:top} "
             "img{image-rendering:pixelated;width:112px}</style></head><body>",
             f"<h1>medfm curate</h1><p>{html.escape(str(path))}: {len(result.items)} items "
             f"({', '.join(f'{k}: {v}' for k, v in per_split.items())}). Thresholds: pHash within "
             f"{result.thresholds['hash_distance']} of 64 bits and pixel correlation at least "
             f"{result.thresholds['pixel_correlation']}, centred-embedding cosine at least "
             f"{result.thresholds['cosine']} with pixel correlation at least "
             f"{result.thresholds['lookalike_correlation']}, outliers above robust z {result.thresholds['outlier_z']}.</p>",
             "<table border=1><tr>" + "".join(f"<th>{k}</th>" for k in kinds) + "</tr><tr>"
             + "".join(f"<td>{summary[k]}</td>" for k in kinds) + "</tr></table>"]
    for kind in kinds:
        shown = [f for f in result.findings if f["kind"] == kind][:max_per_kind]
        if not shown:
            continue
        parts.append(f"<h2>{kind} ({result.count(kind)}; first {len(shown)})</h2><table border=1>")
        for f in shown:
            cells = []
            for side in ("a", "b"):
                if f.get(f"row_{side}") is None:
                    continue
                it = index[(f[f"split_{side}"], f[f"row_{side}"])]
                cells.append(f"<td><img src='{_thumbnail(datasets[it.split], it.position)}'><br>"
                             f"{html.escape(it.source)}<br>split {html.escape(it.split or '-')}"
                             f"{' label ' + html.escape(it.label) if it.label else ''}</td>")
            parts.append(f"<tr><td>{html.escape(f['detail'])}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    write_text(out / "report.html", "\n".join(parts))
    return summary


def run_curation(path: str, out: str | os.PathLike, embedder: Embedder | None, label: str | None = None,
                 patient: str | None = None, hash_distance: int = HASH_DISTANCE, cosine: float = COSINE,
                 balanced: int | None = None, clean: bool = False, seed: int = 0,
                 cache: str | os.PathLike | None = CACHE_DIR, progress: bool = True) -> dict:
    """Curate ``path`` and write the report (module doc); returns the summary."""
    t0 = time.perf_counter()
    out = Path(out)
    result = curate(path, embedder, label, patient, hash_distance, cosine, balanced, seed, cache, progress)
    summary = write_report(path, result, out)
    if clean:
        summary["clean"] = str(write_clean(path, result, out))
        summary["dropped"] = len(dropped(result))
    if result.balanced:
        write_rows(out / "balanced.csv", [{"split": result.items[i].split, "position": result.items[i].position,
                                           "source": result.items[i].source} for i in result.balanced])
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
