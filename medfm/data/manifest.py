"""CSV / JSONL manifests: one row per sample, naming its files, labels, text and split.

Columns (names are arguments): ``image`` (file or DICOM folder, required),
``split``, one or several label columns, ``mask`` (may be empty on unlabelled rows), a report ``text``. Any other
column is kept in ``meta``. Relative paths resolve against the manifest's folder.
Rows are numbered by their line in the file, so errors point at a line to fix.

Cross-validation folds are splits too: ``"train fold 2 of 5"`` is part 2 (from 0) of the ``train`` rows,
``"train without fold 2 of 5"`` the rest (:func:`fold_split`); the parts are drawn once, with a fixed seed, from
the split's rows in manifest order, so every fold of a run, and a resumed run, sees the same ones. ``"train fold 2
of 5 by patient"`` draws whole groups of rows (the values of the ``patient`` column: a patient's slices stay in one
part).

Labels:
  * one label column: class names (or integers) -> an int index into ``classes``;
    ``classes`` defaults to the sorted distinct values over the whole manifest (all
    splits, so every split gets the same indices);
  * one column with ``multi_label=True``: ``|``-separated names -> a multi-hot vector;
  * several label columns: 0/1 per column -> a multi-hot vector, ``classes`` = the columns.
A label outside ``classes`` is an error naming the line.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import DataError, MissingFileError

TRUE = {"1", "1.0", "true", "yes", "y", "t"}
FALSE = {"0", "0.0", "false", "no", "n", "f", ""}


@dataclass
class ManifestRecord:
    line: int
    image: str
    label: Any = None
    mask: str | None = None
    text: str | None = None
    extra: dict = field(default_factory=dict)


def read_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, row dict) for every row of a CSV or JSONL manifest."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: manifest not found")
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for n, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: not valid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
                rows.append((n, row))
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for row in reader:
                if None in row:  # csv puts cells beyond the header under the key None
                    raise DataError(f"{path} line {reader.line_num}: {len(row[None])} more value(s) than the header's "
                                    f"{len(reader.fieldnames or [])} columns (a comma inside an unquoted value?)")
                rows.append((reader.line_num, row))
    else:
        raise DataError(f"{path}: unknown manifest type {path.suffix!r} (use .csv, .tsv or .jsonl)")
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    return rows


def _infer_classes(values: list[str]) -> list[str]:
    distinct = sorted(set(values))
    try:
        return [str(v) for v in sorted(distinct, key=float)]
    except ValueError:
        return distinct


FOLD_SEED = 12345  # nnU-Net's seed for its five folds
_FOLD = re.compile(r"^(?P<split>.+?) (?P<without>without )?fold (?P<k>\d+) of (?P<n>\d+)(?: by (?P<group>\S+))?$")


def fold_split(split: str) -> tuple[str, int, int, bool, str | None] | None:
    """``"train fold 2 of 5"`` -> ("train", 2, 5, False, None), ``"train without fold 2 of 5 by patient"`` ->
    ("train", 2, 5, True, "patient"); None for a plain split name. A fold outside ``0 .. n-1`` or fewer than 2
    folds is an error."""
    m = _FOLD.match(str(split))
    if not m:
        return None
    k, n = int(m["k"]), int(m["n"])
    if n < 2 or not 0 <= k < n:
        raise DataError(f"split {split!r}: a fold k of n needs n >= 2 and 0 <= k < n")
    return m["split"], k, n, bool(m["without"]), m["group"]


def base_split(split: str) -> str:
    """The split a fold is cut from (``"train fold 2 of 5"`` -> ``"train"``); a plain split name as it is."""
    fold = fold_split(split)
    return fold[0] if fold else split


def fold_rows(rows: list[tuple[int, dict]], k: int, n: int, without: bool = False, group: str | None = None) -> list:
    """Part ``k`` of ``n`` of the manifest ``rows`` (or, ``without``, every other part): a seeded permutation
    (:data:`FOLD_SEED`) of the rows, or of the distinct values of their ``group`` column, cut in ``n`` nearly equal
    parts."""
    keys = [str(r.get(group, "")) for _, r in rows] if group else list(range(len(rows)))
    units = list(dict.fromkeys(keys))
    if len(units) < n:
        raise DataError(f"{len(units)} {'values of ' + group if group else 'rows'} cannot make {n} folds")
    order = np.random.RandomState(FOLD_SEED).permutation(len(units))
    part = {units[i] for i in np.array_split(order, n)[k].tolist()}
    return [r for key, r in zip(keys, rows) if (key in part) != without]


def _column(path, rows, key: str) -> None:
    present = set().union(*(r.keys() for _, r in rows))
    if key not in present:
        raise DataError(f"{path}: no column {key!r}; columns are {sorted(present)}")


def read_records(
    manifest: str | os.PathLike,
    split: str | None = None,
    image_key: str = "image",
    label_keys: str | Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    multi_label: bool = False,
    mask_key: str | None = None,
    text_key: str | None = None,
    split_key: str = "split",
    on_error: str = "raise",
    images_repeat: bool = False,
) -> tuple[list[ManifestRecord], list[str] | None, list[tuple[str, str]]]:
    """Parse and check a manifest; return (records, classes, bad rows skipped as (where, why)).
    ``images_repeat``: rows are meant to share images within a split (several questions on one image), so
    only an image in several splits is warned about."""
    path = Path(manifest)
    rows = read_rows(path)
    root = path.parent
    label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys or [])
    for key in [image_key, *label_keys, *(k for k in (mask_key, text_key) if k)]:
        _column(path, rows, key)

    if label_keys and classes is None:
        if len(label_keys) > 1:
            classes = list(label_keys)
        else:
            raw = [str(r.get(label_keys[0], "") or "").strip() for _, r in rows]
            if multi_label:
                raw = [t.strip() for v in raw for t in v.split("|") if t.strip()]
            classes = _infer_classes([v for v in raw if v])
    classes = list(classes) if classes is not None else None
    _warn_duplicates(path, rows, image_key, split_key, images_repeat)

    if split is not None:
        _column(path, rows, split_key)
        present = sorted({str(r.get(split_key, "")) for _, r in rows})
        fold, base = fold_split(split), base_split(split)
        rows = [(n, r) for n, r in rows if str(r.get(split_key, "")) == base]
        if not rows:
            raise DataError(f"{path}: no rows with {split_key}={base!r}; splits present: {present}")
        if fold:
            if fold[4]:
                _column(path, rows, fold[4])
            rows = fold_rows(rows, *fold[1:])

    records, bad = [], []
    for line, row in rows:
        try:
            records.append(_record(path, root, line, row, image_key, label_keys, classes, multi_label, mask_key, text_key))
        except DataError as e:
            if on_error == "raise":
                raise
            bad.append((f"{path} line {line}", str(e)))
    if not records:
        raise DataError(f"{path}: no usable rows ({len(bad)} bad; first: {bad[0][1] if bad else '-'})")
    return records, classes, bad


def _warn_duplicates(path: Path, rows: list[tuple[int, dict]], image_key: str, split_key: str,
                     images_repeat: bool = False) -> None:
    """Warn when one image is listed in several rows (unless ``images_repeat``): across splits it leaks
    held-out data into training."""
    seen: dict[str, list[tuple[int, str]]] = {}
    for line, row in rows:
        image = str(row.get(image_key) or "").strip()
        if image:
            seen.setdefault(image, []).append((line, str(row.get(split_key, "") or "")))
    repeated = {k: v for k, v in seen.items() if len(v) > 1}
    if not repeated:
        return
    leaking = {k: v for k, v in repeated.items() if len({s for _, s in v}) > 1}
    if images_repeat and not leaking:
        return
    image, where = next(iter((leaking or repeated).items()))
    rows_text = ", ".join(f"line {n} ({s or 'no split'})" for n, s in where[:4])
    what = (f"{len(leaking)} image(s) appear in more than one split, so held-out rows are also trained on"
            if leaking else f"{len(repeated)} image(s) are listed more than once")
    warnings.warn(f"{path}: {what}; e.g. {image}: {rows_text}", stacklevel=3)


def _resolve(root: Path, value: Any, where: str, key: str) -> str:
    text = str(value or "").strip()
    if not text:
        raise DataError(f"{where}: empty {key!r}")
    p = Path(text).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.exists():
        raise MissingFileError(f"{where}: {key} file not found: {p}")
    return str(p)


def _record(path, root, line, row, image_key, label_keys, classes, multi_label, mask_key, text_key) -> ManifestRecord:
    where = f"{path} line {line}"
    label: Any = None
    if len(label_keys) == 1 and not multi_label:
        value = str(row.get(label_keys[0], "") or "").strip()
        if not value:
            raise DataError(f"{where}: empty label in column {label_keys[0]!r}")
        if value not in classes:
            raise DataError(f"{where}: label {value!r} in column {label_keys[0]!r} is not one of the classes {classes}")
        label = classes.index(value)
    elif len(label_keys) == 1:
        names = [t.strip() for t in str(row.get(label_keys[0], "") or "").split("|") if t.strip()]
        unknown = [t for t in names if t not in classes]
        if unknown:
            raise DataError(f"{where}: label(s) {unknown} in column {label_keys[0]!r} are not among the classes {classes}")
        label = torch.zeros(len(classes))
        label[[classes.index(t) for t in names]] = 1.0
    elif label_keys:
        label = torch.zeros(len(label_keys))
        for k, key in enumerate(label_keys):
            value = str(row.get(key, "") or "").strip().lower()
            if value not in TRUE | FALSE:
                raise DataError(f"{where}: column {key!r} holds {value!r}; multi-label columns must be 0/1")
            label[k] = float(value in TRUE)
    used = {image_key, *label_keys, mask_key, text_key}
    return ManifestRecord(
        line=line,
        image=_resolve(root, row.get(image_key), where, image_key),
        label=label,
        mask=_resolve(root, row.get(mask_key), where, mask_key) if mask_key and row.get(mask_key) else None,
        text=str(row.get(text_key) or "") if text_key else None,
        extra={k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))},
    )
