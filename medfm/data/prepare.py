"""From each public source's own file layout to the layout medfm reads (docs/data.md).

One function a layout, ``(folder, raw) -> data path``: ``folder`` is the source's folder, ``raw`` holds its
unpacked archives (files are found by name anywhere under it, so an archive's top folder does not matter).
Each writes ``folder/manifest.csv`` with paths relative to it and the official splits (a seeded carve-out
where a source has no validation split), and names the file it could not find.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

from medfm.atomic import atomic_path

from .errors import DataError
from .writers import write_manifest


def _find(raw: Path, pattern: str, what: str) -> list[Path]:
    found = sorted(raw.rglob(pattern))
    if not found:
        raise DataError(f"{raw}: no {pattern} found ({what}); is the archive complete? delete the folder and fetch again")
    return found


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _carve(keys, fraction: float, seed: int = 0) -> set:
    """A seeded ``fraction`` of the sorted distinct ``keys`` (at least one when there are two or more)."""
    keys = sorted(set(keys))
    n = max(1, round(fraction * len(keys))) if len(keys) > 1 else 0
    return set(random.Random(seed).sample(keys, n))


def carve_split(manifest: str | os.PathLike, out: str | os.PathLike, by: str = "image", fraction: float = 0.1,
                source: str = "train", to: str = "val", seed: int = 0) -> Path:
    """A copy of ``manifest`` at ``out`` with a seeded ``fraction`` of the distinct ``by`` values of split
    ``source`` moved to split ``to`` (VQA-RAD: validation carved from train by image, so that no image is in
    both). Relative image paths are rewritten against ``out``'s folder; the other columns are kept."""
    src, dest = Path(manifest), Path(out)
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{src}: an empty manifest")
    if by not in rows[0] or "split" not in rows[0]:
        raise DataError(f"{src}: no {by!r} or 'split' column to carve a {to!r} split by")
    moved = _carve([r[by] for r in rows if r["split"] == source], fraction, seed)
    for r in rows:
        if r["split"] == source and r[by] in moved:
            r["split"] = to
        for key in ("image", "mask"):
            if r.get(key) and not os.path.isabs(r[key]):
                r[key] = os.path.relpath(os.path.abspath(src.parent / r[key]), os.path.abspath(dest.parent))
    dest.parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(dest, rows)


def _three_way(keys, seed: int = 0) -> dict:
    """train / val / test 80/10/10 over distinct keys (a patient, a study)."""
    keys = sorted(set(keys))
    random.Random(seed).shuffle(keys)
    n_val = n_test = max(1, len(keys) // 10) if len(keys) >= 3 else 0
    return {k: "val" if i < n_val else "test" if i < n_val + n_test else "train" for i, k in enumerate(keys)}


def _binary_mask(src: Path, folder: Path) -> tuple[str, bool]:
    """A 0/255 mask image as a 0/1 label map PNG under ``folder/masks/`` (what segmentation reads: 0
    background, 1 lesion); returns its relative path and whether it holds any lesion."""
    import numpy as np
    from PIL import Image

    try:
        m = np.asarray(Image.open(src).convert("L")) > 127
    except OSError as e:
        raise DataError(f"{src}: not a readable mask image ({e})") from e
    out = folder / "masks" / src.parent.name / (src.stem + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m.astype(np.uint8)).save(out)
    return _rel(out, folder), bool(m.any())


def medmnist(filename: str, folder: Path, raw: Path) -> Path:
    """A MedMNIST npz is already a medfm data path: checked to open with its splits, and linked as
    ``folder/NAME.npz`` (a hard link where the file system allows, else a copy)."""
    from .npz import npz_splits

    source = folder / "downloads" / filename
    if "train" not in npz_splits(source):
        raise DataError(f"{source}: no train_images / train_labels arrays")
    path = folder / filename
    if not path.exists() or path.stat().st_size != source.stat().st_size:
        path.unlink(missing_ok=True)
        try:
            os.link(source, path)
        except OSError:
            with atomic_path(path) as tmp:
                shutil.copyfile(source, tmp)
    return path


def decathlon(folder: Path, raw: Path) -> Path:
    """MSD ``dataset.json``: its labelled ``training`` cases split train/val 80/20 by case; ``test`` (no
    labels) into ``test.csv``."""
    spec_file = _find(raw, "dataset.json", "the Decathlon task description")[0]
    root = spec_file.parent
    spec = json.loads(spec_file.read_text())
    cases = [(Path(c["image"]).name.split(".")[0], root / c["image"], root / c["label"]) for c in spec.get("training", [])]
    if not cases:
        raise DataError(f"{spec_file}: lists no training cases")
    val = _carve([c for c, _, _ in cases], 0.2)
    rows = []
    for case, image, label in cases:
        for p in (image, label):
            if not p.exists():
                raise DataError(f"{spec_file}: lists {p.relative_to(root)}, which the archive does not hold")
        rows.append({"image": _rel(image, folder), "mask": _rel(label, folder), "case_id": case,
                     "split": "val" if case in val else "train"})
    tests = [root / t for t in spec.get("test", [])]
    if tests:
        write_manifest(folder / "test.csv", [{"image": _rel(t, folder), "split": "test"} for t in tests if t.exists()])
    return write_manifest(folder / "manifest.csv", rows)


def mni152(folder: Path, raw: Path) -> Path:
    """The quickstart's two real sets from the template nilearn ships: 3D hemispheres and 2D slices."""
    from . import samples

    samples.mni152_slices(folder / "slices", n=96, size=64)
    return samples.mni152_hemispheres(folder / "hemispheres", csf=True)


def iu_xray(folder: Path, raw: Path) -> Path:
    """One row per image: the study's findings + impression, split by study 80/10/10."""
    from .reports import read_iu_xray

    reports = read_iu_xray(folder / "downloads" / "NLMCXR_reports.tgz")
    images = {p.stem: p for p in _find(raw, "*.png", "the Open-i PNG images")}
    split = _three_way([r.uid for r in reports])
    texts = {r.uid: r.text() for r in reports}
    rows = [{"image": _rel(images[i], folder), "text": texts[r.uid], "study": r.uid, "split": split[r.uid]}
            for r in reports if texts[r.uid] for i in r.image_ids if i in images]
    if not rows:
        raise DataError(f"{raw}: no report names an image of the archive (ids like {reports[0].image_ids[:1]})")
    return write_manifest(folder / "manifest.csv", rows)


VQA_COLUMNS = ("qid", "question", "answer", "answer_type", "question_type", "image_organ", "phrase_type")


def vqa_rad(folder: Path, raw: Path) -> Path:
    """MEVF ``trainset.json`` / ``testset.json``: the official split; val = 10 % of the train images."""
    sets = {}
    for name in ("trainset.json", "testset.json"):
        path = _find(raw, name, "the VQA-RAD split file")[0]
        sets[name] = json.loads(path.read_text())
    images = {p.name: p for p in _find(path.parent, "images/*", "the VQA-RAD images")}
    val = _carve([q["image_name"] for q in sets["trainset.json"]], 0.1)
    rows = []
    for name, split in (("trainset.json", "train"), ("testset.json", "test")):
        for q in sets[name]:
            if q["image_name"] not in images:
                raise DataError(f"{name}: question {q.get('qid')} names {q['image_name']}, which images/ does not hold")
            rows.append({"image": _rel(images[q["image_name"]], folder),
                         "split": "val" if split == "train" and q["image_name"] in val else split,
                         **{k: str(q.get(k, "")).strip() for k in VQA_COLUMNS}})
    return write_manifest(folder / "manifest.csv", rows)


def medpix2(folder: Path, raw: Path) -> Path:
    """``descriptions_{train,dev,test}*.jsonl``: one row per image with its caption and labels."""
    images = {p.stem: p for p in _find(raw, "*.png", "the MedPix 2.0 images")}
    rows = []
    for path in _find(raw, "descriptions_*.jsonl", "the MedPix 2.0 split files"):
        split = re.match(r"descriptions_([a-z]+)", path.name).group(1)
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            d = json.loads(line)
            if d["image"] not in images:
                raise DataError(f"{path}:{line_no}: image {d['image']} is not in the archive")
            desc = d.get("Description") or {}
            rows.append({"image": _rel(images[d["image"]], folder), "case_id": d["U_id"], "split": split,
                         "type": d.get("Type", ""), "modality": desc.get("Modality") or "", "plane": desc.get("Plane") or "",
                         "location": d.get("Location") or "", "location_category": d.get("Location Category") or "",
                         "sex": desc.get("Sex") or "", "age": desc.get("Age") or "",
                         "caption": " ".join((desc.get("Caption") or "").split())})
    return write_manifest(folder / "manifest.csv", rows)


def bus_bra(folder: Path, raw: Path) -> Path:
    """``bus_data.csv`` + ``5-fold-cv.csv``: folds 1-3 train, 4 val, 5 test (the published partition); the
    0/255 lesion masks written as 0/1 label maps."""
    data_csv = _find(raw, "bus_data.csv", "the BUS-BRA table")[0]
    with open(_find(raw, "5-fold-cv.csv", "the BUS-BRA folds")[0]) as f:
        folds = {r["ID"]: r["kFold"] for r in csv.DictReader(f)}
    images = {p.stem: p for p in _find(raw, "bus_*.png", "the BUS-BRA images")}
    masks = {p.stem.replace("mask_", "bus_"): p for p in raw.rglob("mask_*.png")}
    rows = []
    with open(data_csv) as f:
        for r in csv.DictReader(f):
            if r["ID"] not in images:
                raise DataError(f"{data_csv}: {r['ID']} has no image {r['ID']}.png in the archive")
            fold = int(folds.get(r["ID"], 0))
            rows.append({"image": _rel(images[r["ID"]], folder),
                         "mask": _binary_mask(masks[r["ID"]], folder)[0] if r["ID"] in masks else "",
                         "patient": r["Case"], "label": r["Pathology"], "birads": r["BIRADS"], "device": r["Device"],
                         "histology": r["Histology"], "fold5": fold,
                         "split": {4: "val", 5: "test"}.get(fold, "train")})
    return write_manifest(folder / "manifest.csv", rows)


def busi(folder: Path, raw: Path) -> Path:
    """Class folders ``benign/ malignant/ normal/`` with ``NAME_mask.png`` beside each image (written as 0/1)."""
    rows, images = [], [p for p in _find(raw, "*.png", "the BUSI images") if "_mask" not in p.stem]
    split = _three_way([p.stem for p in images])
    for p in images:
        label = p.parent.name.lower()
        if label not in ("benign", "malignant", "normal"):
            continue
        mask = p.with_name(p.stem + "_mask.png")
        rows.append({"image": _rel(p, folder), "mask": _binary_mask(mask, folder)[0] if mask.exists() else "", "label": label,
                     "split": split[p.stem]})
    if not rows:
        raise DataError(f"{raw}: no PNG under a benign/, malignant/ or normal/ folder")
    return write_manifest(folder / "manifest.csv", rows)


def pediatric_cxr(folder: Path, raw: Path) -> Path:
    """``chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg``; val = 10 % of the train images."""
    files = [p for p in _find(raw, "*.jpeg", "the chest X-ray images") if p.parent.name in ("NORMAL", "PNEUMONIA")
             and p.parent.parent.name in ("train", "test")]
    val = _carve([p.name for p in files if p.parent.parent.name == "train"], 0.1)
    rows = [{"image": _rel(p, folder), "label": p.parent.name.lower(),
             "split": "test" if p.parent.parent.name == "test" else "val" if p.name in val else "train"} for p in files]
    if not rows:
        raise DataError(f"{raw}: no .jpeg under train/ or test/ NORMAL/ PNEUMONIA/ folders")
    return write_manifest(folder / "manifest.csv", rows)


def lgg_flair(folder: Path, raw: Path) -> Path:
    """``kaggle_3m/PATIENT/PATIENT_N.tif`` with ``PATIENT_N_mask.tif`` (0/255, written as 0/1 PNG with a
    ``has_tumor`` column); split by patient 80/10/10."""
    pairs = defaultdict(list)
    for p in _find(raw, "*_mask.tif", "the LGG masks"):
        image = p.with_name(p.name.replace("_mask.tif", ".tif"))
        if image.exists():
            pairs[p.parent.name].append((image, p))
    split = _three_way(pairs)
    rows = []
    for patient, items in sorted(pairs.items()):
        for image, mask in sorted(items):
            mask, lesion = _binary_mask(mask, folder)
            rows.append({"image": _rel(image, folder), "mask": mask, "patient": patient, "has_tumor": int(lesion),
                         "split": split[patient]})
    return write_manifest(folder / "manifest.csv", rows)
