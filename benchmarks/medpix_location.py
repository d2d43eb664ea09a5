"""A second real 2D task: body region (``location_category``, 5 classes) of MedPix 2.0 CT/MR images.

Trains ``tasks/classify_2d.yaml`` on the MedPix ``train`` split and reports on ``dev`` (the test split is
withheld): ViT-Tiny/4 at 32x32 (the encoder of ``benchmarks/mae_probe_quality.py``), from random init and
from the MAE encoder pretrained on PneumoniaMNIST chest X-rays (another modality), frozen (linear probe)
and fully fine-tuned, same budget per row. The majority-class rate of ``dev`` is the chance reference.

    python benchmarks/medpix_location.py --data ../shared/data/medpix2/manifest.csv --pretrained runs/mae_probe_quality
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

from medfm.finetune.recipe import load_task_recipe, run_finetune

REPO = Path(__file__).resolve().parents[1]
LR = {"linear_probe": 3e-3, "full": 3e-4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="medpix2/manifest.csv")
    ap.add_argument("--pretrained", default=str(REPO / "runs" / "mae_probe_quality"))
    ap.add_argument("--out", default=str(REPO / "runs" / "medpix_location"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    dev = [r["location_category"] for r in csv.DictReader(open(args.data)) if r["split"] == "dev"]
    majority = Counter(dev).most_common(1)[0][1] / len(dev)
    rows = []
    for init in ("random", "MAE"):
        for method in ("linear_probe", "full"):
            run = out / f"{init}_{method}"
            if not (run / "metrics.json").exists():
                cfg = load_task_recipe(REPO / "tasks" / "classify_2d.yaml", {
                    "method": method,
                    "encoder": {"name": "vit_tiny", "img_size": 32, "patch_size": 4,
                                "pretrained": str(Path(args.pretrained) / "encoder") if init == "MAE" else None},
                    "classification": {"label": "location_category"},
                    "optim": {"lr": LR[method]},
                    "data": {"val_split": "dev", "batch_size": args.batch, "num_workers": 2},
                    "trainer": {"max_steps": args.steps, "enable_progress_bar": False},
                })
                if run.exists():
                    import shutil

                    shutil.rmtree(run)
                run_finetune(cfg, run, data_path=args.data)
            m = json.loads((run / "metrics.json").read_text())
            rows.append((init, method, m))
    print(f"\nMedPix 2.0 location_category (5 classes), train 1653 -> dev {len(dev)}, ViT-Tiny/4 at 32x32, "
          f"{args.steps} steps x batch {args.batch}, class-weighted CE, CPU fp32\n")
    print("| encoder init | method | dev accuracy | dev balanced acc. | dev macro AUROC | dev macro F1 | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for init, method, m in rows:
        v = m["dev"]
        print(f"| {init} | {method} | {v['accuracy']:.3f} | {v['balanced_accuracy']:.3f} | {v['auroc']:.3f} | "
              f"{v['f1']:.3f} | {m['wall_time_s']:.0f} |")
    print(f"| majority class (Head) | - | {majority:.3f} | 0.200 | 0.500 | - | - |")


if __name__ == "__main__":
    main()
