"""Real images for the selection and curation tests: distinct MNI152 and pydicom slices, and a manifest with
planted copies (exact, noisy, JPEG, gamma, resized) whose pairs are known."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from medfm.data import load, samples


def distinct_slices() -> list[np.ndarray]:
    """Ten real 2D images no two of which are copies: MNI152 T1 slices 30 mm apart along each axis and two
    pydicom samples (CT, MR), 8-bit, 64 x 64."""
    vol = load(samples.mni152("t1"))["image"][0].numpy()
    cuts = [vol[:, :, k] for k in (50, 80, 110, 140)] + [vol[:, k, :] for k in (60, 100, 140)] + \
           [vol[k, :, :] for k in (60, 130)]
    cuts.append(load(samples.pydicom_file("CT_small.dcm"))["image"][0].numpy())
    out = []
    for a in cuts:
        a = np.asarray(a, np.float32)
        u8 = (255 * (a - a.min()) / max(np.ptp(a), 1e-6)).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(u8).resize((64, 64), Image.BILINEAR)))
    return out


PLANTED = {  # copy name -> (original index, how, split, label)
    "copy_exact": (0, "exact", "val", "a"),
    "copy_noise": (1, "noise", "train", "b"),
    "copy_jpeg": (2, "jpeg", "val", "a"),
    "copy_gamma": (3, "gamma", "train", "a"),  # its original is labelled b: a label conflict
    "copy_resized": (4, "resize", "train", "a"),
}


def planted_manifest(folder: Path) -> tuple[Path, set[tuple[str, str]]]:
    """``folder/manifest.csv`` of the distinct images (train, labels alternating a / b, the last two val) and
    the planted copies; returns it and the set of expected (original, copy) file-name pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    images = distinct_slices()
    rows = []
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "label": "ab"[i % 2], "patient": f"p{i}",
                     "split": "val" if i >= len(images) - 2 else "train"})
    rng = np.random.default_rng(0)
    for name, (i, how, split, label) in PLANTED.items():
        a = images[i].astype(np.float32)
        if how == "noise":
            a = a + rng.normal(0, 4, a.shape)
        elif how == "gamma":
            a = 255 * (a / 255) ** 0.8
        elif how == "resize":
            a = np.asarray(Image.fromarray(images[i]).resize((48, 48), Image.BILINEAR).resize((64, 64)), np.float32)
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        if how == "jpeg":
            im.save(folder / f"{name}.jpg", quality=70)
            file = f"{name}.jpg"
        else:
            im.save(folder / f"{name}.png")
            file = f"{name}.png"
        rows.append({"image": file, "label": label, "patient": f"q{i}", "split": split})
    rows[-1]["patient"] = "p9"  # the resized copy's patient is also img9's (val): a patient leak
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "patient", "split"])
        w.writeheader()
        w.writerows(rows)
    expected = {(f"img{i}.png", next(r["image"] for r in rows if r["image"].startswith(n)))
                for n, (i, _, _, _) in PLANTED.items()}
    return folder / "manifest.csv", expected
