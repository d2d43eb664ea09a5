"""Class-conditioned diffusion on PneumoniaMNIST (32 px): is the generated data any use?

Trains ``generators/diffusion_2d.yaml`` on the real ``train`` split (or takes ``--run``), then ``medfm evaluate``
for generators: ``--n`` samples drawn with the training class frequencies; utility = the classification
recipe (``tasks/classify_2d.yaml``, a small ViT fully fine-tuned at 32 px, same budget) trained on real /
generated / both and tested on the real ``val`` split (AUROC); conditioning accuracy; Fréchet distance and
MMD in the real-only classifier's feature space against the real-vs-real value; MS-SSIM diversity;
nearest-training-image distances. Prints one table.

    python benchmarks/generate_pneumonia.py --data ../shared/data/pneumoniamnist/pneumoniamnist_trainval.npz \
        --steps 2500 --n 500 --classify-steps 600
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medfm.generate import load_generator_recipe, run_generator
from medfm.generate.evaluate import evaluate_generator, summary_lines

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="pneumoniamnist_trainval.npz")
    ap.add_argument("--run", default=str(REPO / "runs" / "gen_pneumonia"), help="generator run (trained if absent)")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: the recipe's)")
    ap.add_argument("--classify-steps", type=int, default=600)
    ap.add_argument("--out", default=None, help="evaluation folder (default RUN/eval_val)")
    args = ap.parse_args()
    run = Path(args.run)
    t0 = time.perf_counter()
    if not (run / "model" / "config.json").exists():
        cfg = load_generator_recipe(REPO / "generators" / "diffusion_2d.yaml", {"trainer": {"max_steps": args.steps}})
        run_generator(cfg, run, data_path=args.data, resume=(run / "checkpoints" / "last.ckpt").exists())
    t_train = time.perf_counter() - t0
    classify = ["encoder.name=vit_tiny", "encoder.img_size=32", "encoder.patch_size=4", "method=full",
                f"trainer.max_steps={args.classify_steps}", "optim.lr=5e-4", "data.batch_size=64",
                "trainer.checkpoint_every_n_steps=1000"]
    m = evaluate_generator(run, data=args.data, split="val", out=args.out, n=args.n, overrides=classify,
                           steps=args.sample_steps)
    print(f"\ngenerator {run} (training {t_train:.0f} s this call), evaluation {time.perf_counter() - t0 - t_train:.0f} s")
    print("\n".join(summary_lines(m)))
    u, c, d, v, mem = m["utility"], m["conditioning"], m["distance"], m["diversity"], m["memorisation"]
    print("\n| classifier trained on | val AUROC | val accuracy | val balanced accuracy |\n|---|---|---|---|")
    for k in ("real", "generated", "both"):
        print(f"| {k} | {u[k]['auroc']:.3f} | {u[k]['accuracy']:.3f} | {u[k]['balanced_accuracy']:.3f} |")
    print("\n| measure | generated | real reference |\n|---|---|---|")
    print(f"| conditioning accuracy (real-only classifier, val threshold) | {c['accuracy']:.3f} | {c['real_accuracy']:.3f} (real val) |")
    g, r = d["generated_vs_real"], d["real_vs_real"]
    print(f"| Fréchet distance (real-only classifier's ViT features) | {g['frechet']:.3f} | {r['frechet']:.3f} (real vs real, n={r['n_real']}) |")
    print(f"| MMD, KID polynomial kernel | {g['mmd']:.4f} | {r['mmd']:.4f} |")
    print(f"| MS-SSIM between random pairs (diversity; lower = more varied) | {v['generated']['ms_ssim']:.3f} | {v['real']['ms_ssim']:.3f} |")
    print(f"| median RMS distance to the nearest training image | {mem['generated_median']:.4f} | {mem['heldout_median']:.4f} (held-out val) |")
    print(f"| fraction closer than the held-out 5th percentile | {mem['fraction_closer_than_heldout_p05']:.3f} | 0.05 by definition |")
    print(json.dumps({"run": str(run), "metrics": str(Path(args.out or run / 'eval_val') / 'metrics.json')}))


if __name__ == "__main__":
    main()
