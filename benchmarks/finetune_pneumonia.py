"""Adaptation methods compared on PneumoniaMNIST: linear probe, full, LoRA, VPT, SSF, BitFit,
each from random init and from the MAE-pretrained encoder, same encoder and budget for every row.

Encoder: ViT-Tiny/4 at 32x32 (the architecture ``benchmarks/mae_probe_quality.py`` pretrains; its run
folder is ``--pretrained``). Every row trains ``--steps`` steps of batch ``--batch`` on the PneumoniaMNIST
``train`` split with ``tasks/classify_2d.yaml`` (class-weighted cross-entropy, the preset's augmentation)
and reports on the official ``val`` split (the test split is withheld): AUROC, accuracy (threshold 0.5),
trainable parameters, wall time on this machine. Each method has one learning rate (below), the same for
both initialisations. Prints a markdown table and writes ``finetune_pneumonia.png`` into ``--out``;
finished rows are kept (re-running continues).

    python benchmarks/finetune_pneumonia.py --data ../shared/data/pneumoniamnist/pneumoniamnist_trainval.npz \\
        --pretrained runs/mae_probe_quality
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medfm.finetune.recipe import load_task_recipe, run_finetune

REPO = Path(__file__).resolve().parents[1]
LR = {"linear_probe": 3e-3, "full": 3e-4, "lora": 1e-3, "vpt": 3e-3, "ssf": 1e-3, "bitfit": 1e-3}
PUBLISHED = [  # MedMNIST v2 (Yang et al., Scientific Data 2023), official *test* split, AUC / ACC
    ("ResNet-18 (28)", 0.944, 0.854), ("ResNet-50 (224)", 0.962, 0.884), ("Google AutoML Vision", 0.991, 0.946)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--pretrained", default=str(REPO / "runs" / "mae_probe_quality"), help="MAE run folder")
    ap.add_argument("--out", default=str(REPO / "runs" / "finetune_pneumonia"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--methods", default=",".join(LR))
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for init in ("random", "MAE"):
        for method in args.methods.split(","):
            run = out / f"{init}_{method}"
            if not (run / "metrics.json").exists():
                enc = {"name": "vit_tiny", "img_size": 32, "patch_size": 4,
                       "pretrained": str(Path(args.pretrained) / "encoder") if init == "MAE" else None}
                cfg = load_task_recipe(REPO / "tasks" / "classify_2d.yaml", {
                    "method": method, "encoder": enc, "optim": {"lr": LR[method]},
                    "data": {"batch_size": args.batch, "num_workers": 2},
                    "trainer": {"max_steps": args.steps, "enable_progress_bar": False, "checkpoint_every_n_steps": 100},
                })
                if run.exists():  # an interrupted row: start it again
                    import shutil

                    shutil.rmtree(run)
                run_finetune(cfg, run, data_path=args.data)
            m = json.loads((run / "metrics.json").read_text())
            rows.append((init, method, m))
            print(f"{init:>6} {method:<12} AUROC {m['val']['auroc']:.4f} acc {m['val']['accuracy']:.4f} "
                  f"trainable {m['trainable_params']:,} time {m['wall_time_s']:.0f} s", flush=True)
    lines = [
        f"PneumoniaMNIST (train {3882} -> official val 524), ViT-Tiny/4 at 32x32, {args.steps} steps x batch "
        f"{args.batch}, class-weighted CE, same budget per row; CPU fp32",
        "",
        "| init | method | LR | val AUROC | val accuracy | val balanced acc. | trainable params | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for init, method, m in rows:
        v = m["val"]
        lines.append(f"| {init} | {method} | {LR[method]:g} | {v['auroc']:.4f} | {v['accuracy']:.4f} | "
                     f"{v['balanced_accuracy']:.4f} | {m['trainable_params']:,} | {m['wall_time_s']:.0f} |")
    lines += ["", "Published MedMNIST v2 baselines (official test split, not comparable one to one):", "",
              "| model | test AUC | test ACC |", "|---|---|---|"]
    lines += [f"| {n} | {a:.3f} | {c:.3f} |" for n, a, c in PUBLISHED]
    print("\n".join(lines))
    _plot(rows, out / "finetune_pneumonia.png")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(m for _, m, _ in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, init in enumerate(("random", "MAE")):
        vals = [next((r[2]["val"]["auroc"] for r in rows if r[0] == init and r[1] == m), np.nan) for m in methods]
        ax.bar(np.arange(len(methods)) + 0.38 * (k - 0.5), vals, 0.38, label=f"{init} init")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("val AUROC")
    ax.set_title("PneumoniaMNIST: adaptation methods (ViT-Tiny/4, 32x32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
