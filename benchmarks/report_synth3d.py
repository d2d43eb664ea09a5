"""Report generation in 3D where the truth is known: engine volumes with templated reports.

``medfm.synthetic.reports.synthetic_report_set`` writes ``--n`` volumes (one random structure each) with a
report naming its side, size and contrast; ``tasks/report_3d.yaml`` trains on ``train`` and writes reports
for ``dev``; scored by whether each report names the true side / size / contrast, for the model and the
most-common / random / nearest-neighbour training report, over seeds (mean ± std).

    python benchmarks/report_synth3d.py --n 200 --steps 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medfm.finetune import load_task_recipe, run_finetune
from medfm.synthetic.reports import ATTRIBUTES, synthetic_report_set

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "report_synth3d"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoder", default="vit_micro")
    ap.add_argument("--method", default="full")
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args()
    out = Path(args.out)
    manifest = out / "data" / "manifest.csv"
    if not manifest.exists():
        synthetic_report_set(args.n, out / "data", size=args.size, seed=1000)
    results = []
    for seed in args.seeds:
        run = out / f"seed{seed}"
        cfg = load_task_recipe(REPO / "tasks" / "report_3d.yaml", {
            "method": args.method, "seed": seed,
            "encoder": {"name": args.encoder, "img_size": args.size, "patch_size": 8},
            "report_generation": {"attributes": {k: list(v) for k, v in ATTRIBUTES.items()}, "meteor": False},
            "data": {"val_split": "dev", "test_split": None, "preset": "mr_3d", "preset_args": {"spacing": 1.0},
                     "batch_size": args.batch, "num_workers": 2},
            "optim": {"lr": args.lr, "warmup_steps": args.steps // 10},
            "trainer": {"max_steps": args.steps, "checkpoint_every_n_steps": 200, "log_every_n_steps": 10},
        })
        if not (run / "metrics.json").exists():
            run_finetune(cfg, run, data_path=str(manifest), resume=(run / "checkpoints" / "last.ckpt").exists())
        results.append(json.loads((run / "metrics.json").read_text())["dev"])
    print(f"engine volumes {args.size}^3, {args.n} ({results[0]['n']} dev), {args.encoder}/8, {args.method}, "
          f"{args.steps} steps x {args.batch}, seeds {args.seeds}\n")
    print("| reports from | " + " | ".join(f"names {a}" for a in ATTRIBUTES) + " | mean attribute F1 | BLEU-4 |")
    print("|---|" + "---|" * (len(ATTRIBUTES) + 2))
    for name in [k for k in results[0] if isinstance(results[0][k], dict)]:
        acc = [[r[name]["attributes"][a]["accuracy"] for r in results] for a in ATTRIBUTES]
        f1 = [np.mean([r[name]["attributes"][a]["f1_macro"] for a in ATTRIBUTES]) for r in results]
        b4 = [r[name]["bleu_4"] for r in results]
        cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in (*acc, f1, b4)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
