"""Promptable segmentation (issue 42): `medfm finetune tasks/promptable_2d.yaml` on a 2D segmentation manifest, as a
new user runs it, scored on its validation split with simulated prompts (a jittered ground-truth box, 1 / 3 / 5
clicks); with ``--volumes``, a 3D manifest is cut into axial slices for training and its validation volumes are
segmented by propagation from one box on each object's middle slice (``medfm segment VOLUME --box ... --slice K``).

    python benchmarks/promptable.py --data ../shared/data/lgg_flair_seg/manifest.csv --steps 500 --out runs/bench_prompt_lgg
    python benchmarks/promptable.py --data ../shared/data/lgg_flair_seg/manifest.csv --steps 500 \\
        --encoder runs/mae_lgg --out runs/bench_prompt_lgg_mae
    python benchmarks/promptable.py --volumes ../shared/data/msd_hippocampus/manifest.csv --steps 500 \\
        --out runs/bench_prompt_hippo

Prints a markdown table (Dice and NSD per prompt, CPU seconds per image encoding and per prompt, training minutes)
and writes OUT/results.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from medfm.cli import main as medfm
from medfm.data.writers import write_manifest
from medfm.evaluate.prompts import box_from_mask, dice


def slice_manifest(volumes: Path, out: Path, split: str = "train") -> Path:
    """The ``split`` volumes of a 3D manifest as axial slices (the last voxel axis; shown transposed, as
    ``medfm segment`` shows a volume's slice) that hold a label, PNG image (min-max per volume) and label map."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(volumes) as f:
        for row in csv.DictReader(f):
            if row["split"] != split:
                continue
            vol = np.asarray(nib.load(volumes.parent / row["image"]).dataobj, dtype=np.float32)
            lab = np.asarray(nib.load(volumes.parent / row["mask"]).dataobj).astype(np.uint8)
            lo, hi = np.percentile(vol, [0.5, 99.5])
            vol = np.clip((vol - lo) / max(hi - lo, 1e-6), 0, 1)
            case = Path(row["image"]).name.split(".")[0]
            for k in np.nonzero(lab.any((0, 1)))[0]:
                name = f"{case}_{k:03d}.png"
                Image.fromarray((vol[:, :, k].T * 255).round().astype(np.uint8)).save(out / f"img_{name}")
                Image.fromarray(lab[:, :, k].T).save(out / f"lab_{name}")
                rows.append({"image": f"img_{name}", "mask": f"lab_{name}", "split": "train"})
    # a validation split the recipe can score (prompted slices): every 10th slice moves there
    for i, r in enumerate(rows):
        if i % 10 == 9:
            r["split"] = "val"
    return write_manifest(out / "manifest.csv", rows)


def propagated_dice(run: Path, volumes: Path, split: str = "val") -> dict:
    """Each object (class) of each ``split`` volume segmented by propagation from a box (no jitter) on its middle
    slice: 3D Dice per class, CPU seconds per volume."""
    from medfm.heads.promptable import load_promptable, propagate

    model = load_promptable(run)
    classes, names = model.spec["head"]["classes"], model.spec["head"]["class_names"]
    per_class: dict[str, list[float]] = {n: [] for n in names}
    cpu, n = 0.0, 0
    with open(volumes) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    for row in rows:
        vol = np.asarray(nib.load(volumes.parent / row["image"]).dataobj, dtype=np.float32)
        lab = np.asarray(nib.load(volumes.parent / row["mask"]).dataobj)
        for c, name in zip(classes, names):
            truth = lab == c
            ks = np.nonzero(truth.any((0, 1)))[0]
            if not len(ks):
                continue
            k = int(ks[len(ks) // 2])
            t0 = time.process_time()
            pred = propagate(model, vol, k, box=box_from_mask(truth[:, :, k].T))
            cpu += time.process_time() - t0
            n += 1
            per_class[name].append(dice(pred, truth))
    out = {f"dice/{k}": float(np.mean(v)) for k, v in per_class.items() if v}
    out.update(mean_dice=float(np.mean([np.mean(v) for v in per_class.values() if v])), objects=n,
               cpu_s_per_object=cpu / max(n, 1), volumes=len(rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a 2D segmentation manifest")
    ap.add_argument("--volumes", default=None, help="a 3D segmentation manifest: trained on its slices, scored by "
                    "propagation on its validation volumes")
    ap.add_argument("--out", default="runs/bench_prompt")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--encoder", default=None, help="pretrained weights (a run, an encoder folder, a checkpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="more recipe overrides, KEY=VALUE")
    args = ap.parse_args()
    out = Path(args.out)
    if bool(args.data) == bool(args.volumes):
        ap.error("give --data (2D) or --volumes (3D)")
    data = Path(args.data).resolve() if args.data else slice_manifest(Path(args.volumes).resolve(), out / "slices")
    run = out / "run"
    t0 = time.perf_counter()
    assert medfm(["finetune", "tasks/promptable_2d.yaml", "--data", str(data), "--out", str(run), "--overwrite",
                  "--max-steps", str(args.steps), f"seed={args.seed}", "data.test_split=null",
                  "trainer.enable_progress_bar=false", *(["--encoder", args.encoder] if args.encoder else []),
                  *args.overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    val = metrics["val"]
    lines = [f"# promptable: {data} ({args.steps} steps, encoder {args.encoder or 'random'})", "",
             "| prompt | Dice | NSD (2 px) |", "|---|---|---|"]
    for p in ["box", *sorted({k.split("_dice")[0] for k in val if k.startswith("click_") and "/" not in k},
                             key=lambda s: int(s.split("_")[1]))]:
        lines.append(f"| {p.replace('_', ' ')} | {val[f'{p}_dice']:.3f} | {val[f'{p}_nsd']:.3f} |")
    lines += ["", f"objects {val['n']} on {val['n_images']} images; training {metrics['train_time_s'] / 60:.1f} min "
              f"(wall, {metrics['steps']} steps); CPU s per image encoding {val['cpu_s_per_image']:.3f}, per prompt "
              f"{val['cpu_s_per_prompt']:.4f}; total {(time.perf_counter() - t0) / 60:.1f} min"]
    if args.volumes:
        prop = propagated_dice(run, Path(args.volumes).resolve())
        lines += ["", "3D by propagation from one box on each object's middle slice (val volumes):", "",
                  "| " + " | ".join(prop) + " |", "|" + "---|" * len(prop),
                  "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in prop.values()) + " |"]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
