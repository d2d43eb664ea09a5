"""``medfm curate`` on every set in ../shared/data: the findings table of benchmarks/RESULTS.md ("Selection and
curation"). Each set is curated with a random-init ViT-Tiny at 64 px (3D sets: pixel hashes of the middle
slice only) into OUT/<set>/ (report.html, findings.csv, summary.json); a set already curated there is read,
not redone.

    python benchmarks/curate_shared.py --shared ../shared/data --out runs/curate_shared
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medfm.select.curate import run_curation
from medfm.select.embeddings import load_embedder

# set name -> (path under the shared folder, label column, patient column, use embeddings)
SETS = {
    "breast_us": ("breast_us/manifest.csv", "label", "patient", True),
    "pneumoniamnist": ("pneumoniamnist/pneumoniamnist_trainval.npz", None, None, True),
    "breastmnist": ("medmnist/breastmnist_trainval.npz", None, None, True),
    "adrenalmnist3d": ("medmnist/adrenalmnist3d_trainval.npz", None, None, False),
    "medpix2": ("medpix2/manifest.csv", "location_category", "case_id", True),
    "pediatric_cxr_224": ("pediatric_cxr_224/manifest.csv", "label", None, True),
    "lgg_flair_seg": ("lgg_flair_seg/manifest.csv", "has_tumor", "patient", True),
    "msd_hippocampus": ("msd_hippocampus/manifest.csv", None, "case_id", False),
    "vqa_rad": ("vqa_rad/manifest.csv", "image_organ", None, True),
}
KINDS = ("duplicate", "leak", "patient_leak", "label_conflict", "outlier", "same_file")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="runs/curate_shared")
    args = ap.parse_args()
    embedder = load_embedder("vit_tiny", size=64)
    lines = ["| set | items (splits) | " + " | ".join(KINDS) + " | s |", "|---|---|" + "---:|" * (len(KINDS) + 1)]
    for name, (rel, label, patient, use_embeddings) in SETS.items():
        path, out = Path(args.shared) / rel, Path(args.out) / name
        if not path.exists():
            print(f"{name}: {path} is absent, skipped")
            continue
        done = out / "summary.json"
        s = json.loads(done.read_text()) if done.exists() else run_curation(
            str(path), out, embedder if use_embeddings else None, label, patient)
        splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items())
        lines.append(f"| {name} | {s['items']} ({splits}) | " + " | ".join(str(s[k]) for k in KINDS)
                     + f" | {s.get('wall_s', '')} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
