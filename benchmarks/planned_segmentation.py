"""Planned segmentation (issue 41): `--plan auto` on a segmentation manifest, as a new user runs it, scored on its
validation split; Dice per class and HD95, training minutes, and for 2D slice sets the Dice per patient (the
slices of each patient's validation volume predicted with `medfm predict` and pooled).

    python benchmarks/planned_segmentation.py --data ../shared/data/msd_hippocampus/manifest.csv --steps 500 \\
        --seeds 0 1 2 --out runs/bench_plan_hippo
    python benchmarks/planned_segmentation.py --data ../shared/data/lgg_flair_seg/manifest.csv --steps 500 \\
        --patient patient --out runs/bench_plan_lgg

Each run is ``medfm finetune tasks/segment_{2d,3d}.yaml --data DATA --plan auto --profile cpu --max-steps STEPS``
(``--profile none`` for the recipe's own widths); ``--network NET`` sets ``segmentation.network`` (auto, dynunet,
segresnet, swinunetr, unetr), ``--encoder RUN`` starts from pretrained weights, ``--folds K`` trains K folds of the
training split and scores their ensemble (and each fold) on the validation split. Prints a markdown table and
writes OUT/results.md.

    python benchmarks/planned_segmentation.py --data ../shared/data/msd_hippocampus/manifest.csv --steps 500 \
        --network segresnet --out runs/bench_plan_segresnet
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from medfm.cli import main as medfm
from medfm.finetune import run_recipe as medfm_recipe

REPO = Path(__file__).resolve().parents[1]


def per_patient_dice(run: Path, data: Path, split: str, patient: str, mask: str = "mask") -> tuple[dict, float]:
    """Dice of each patient's validation slices taken together (predictions from ``medfm predict``), and the mean
    Dice over the slices that hold an object (the objects a promptable model is scored on)."""
    pred_dir = run / "predict_val"
    assert medfm(["predict", str(run), "--data", str(data), "--split", split, "--out", str(pred_dir)]) == 0
    inter, total, objects = {}, {}, []
    with open(data) as f:
        for row in csv.DictReader(f):
            if row["split"] != split:
                continue
            truth = np.asarray(Image.open(data.parent / row[mask])) > 0
            pred = np.asarray(Image.open(pred_dir / f"{Path(row['image']).name.split('.')[0]}_seg.png")) > 0
            p = row[patient]
            inter[p] = inter.get(p, 0) + int((truth & pred).sum())
            total[p] = total.get(p, 0) + int(truth.sum() + pred.sum())
            if truth.any():
                objects.append(2 * int((truth & pred).sum()) / int(truth.sum() + pred.sum()))
    return {p: (2 * inter[p] / total[p] if total[p] else 1.0) for p in inter}, float(np.mean(objects))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/bench_plan")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--patient", default=None, help="2D slice sets: the column naming each slice's patient")
    ap.add_argument("--network", default=None, help="segmentation.network (default: the plan's, auto)")
    ap.add_argument("--encoder", default=None, help="pretrained weights (a run, an encoder folder, a checkpoint)")
    ap.add_argument("--folds", type=int, default=None, help="train K folds and score their ensemble")
    ap.add_argument("overrides", nargs="*", help="more recipe overrides, KEY=VALUE")
    args = ap.parse_args()
    data, out = Path(args.data).resolve(), Path(args.out)
    with open(data) as f:
        first = next(csv.DictReader(f))["image"].lower()
    dims = 3 if first.endswith((".nii", ".nii.gz")) else 2
    rows = []
    for seed in args.seeds:
        run = out / f"seed{seed}"
        extra = [*(["--encoder", args.encoder] if args.encoder else []), *(["--folds", str(args.folds)] if args.folds else []),
                 *([f"segmentation.network={args.network}"] if args.network else []), *args.overrides]
        assert medfm(["finetune", f"segment_{dims}d", "--data", str(data), "--plan", "auto", "--profile", args.profile,
                      "--out", str(run), "--max-steps", str(args.steps), "--overwrite", f"seed={seed}",
                      "data.test_split=null", f"data.val_split={args.val_split}", "trainer.enable_progress_bar=false",
                      *extra]) == 0
        if args.folds:  # the ensemble on the validation split; training minutes summed over the folds
            e = json.loads((run / "metrics.json").read_text())
            folds = [json.loads((run / f"fold_{k}" / "metrics.json").read_text()) for k in range(args.folds)]
            m = {"steps": sum(f["steps"] for f in folds), "train_time_s": sum(f["train_time_s"] for f in folds),
                 "network": folds[0].get("network")}
            v = e["ensemble"]
            for k, f in e["per_fold"].items():
                print(f"{k}: {args.val_split} mean Dice {f['mean_dice']:.3f}")
        else:
            m = json.loads((run / "metrics.json").read_text())
            v = m[args.val_split]
        recipe = medfm_recipe(run / "fold_0" if args.folds else run)
        row = {"seed": seed, "network": recipe["segmentation"]["network"], "encoder": recipe["encoder"]["name"],
               "steps": m["steps"], "train_min": m["train_time_s"] / 60, "mean_dice": v["mean_dice"],
               **{f"dice {k}": d for k, d in v["dice"].items()}, "mean_hd95": v.get("mean_hd95", float("nan"))}
        if args.patient:
            patients, objects = per_patient_dice(run, data, args.val_split, args.patient)
            row["patient_dice_mean"] = float(np.mean(list(patients.values())))
            row["object_slice_dice"] = objects
            row["patients"] = len(patients)
            (run / "patient_dice.json").write_text(json.dumps(patients, indent=1))
        rows.append(row)
    keys = list(rows[0])
    table = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n" + "\n".join(
        "| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows)
    if len(rows) > 1:
        table += "\n\nmean over seeds: " + ", ".join(
            f"{k} {np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}"
            for k in keys if isinstance(rows[0][k], float))
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
