"""Visual question answering on VQA-RAD: the model against its baselines, over seeds.

``tasks/vqa_2d.yaml`` (ViT-Tiny/8 at 64 px, random init, unless ``--encoder``) trained on the official train split minus a validation split carved from it **by image**
(10 % of the images, seed 0: no image is in both), scored on that validation split (the official test
split is withheld here). Each seed reports, for the model and every baseline (question-only model trained
in the same run, the model with blank and with shuffled images, the most common training answer per
question type): closed accuracy, open accuracy (exact match after normalisation), open token-F1 and BLEU-1;
image sensitivity; accuracy per question type. Mean ± std over seeds, as markdown tables.

    python benchmarks/vqa_rad.py --data ../shared/data/vqa_rad/manifest.csv --steps 600 --seeds 0 1 2 --out runs/bench_vqa
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medfm.data.prepare import carve_split
from medfm.finetune import load_task_recipe, run_finetune

REPO = Path(__file__).resolve().parents[1]
SCORES = ("closed_accuracy", "open_accuracy", "open_token_f1", "open_bleu_1")


def mean_std(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}" if v.size else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/vqa_rad/manifest.csv")
    ap.add_argument("--out", default="runs/bench_vqa")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoder", default=None, help="a pretrained encoder (folder / run) instead of random init")
    ap.add_argument("--size", type=int, default=64, help="input size of the encoder, random-init or pretrained "
                    "(default 64)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides (e.g. encoder.img_size=96)")
    args = ap.parse_args()
    out = Path(args.out)
    manifest = carve_split(args.data, out / "manifest.csv", by="image", fraction=0.1)
    runs = []
    for seed in args.seeds:
        over = {"seed": seed, "data": {"path": str(manifest), "test_split": None},
                "trainer": {"max_steps": args.steps, "checkpoint_every_n_steps": args.steps}}
        # the input size is the benchmark's for a pretrained encoder too (the recipe's own is GPU-scale 224 px)
        over["encoder"] = ({"pretrained": args.encoder, "img_size": args.size} if args.encoder else
                           {"name": "vit_tiny", "img_size": args.size, "patch_size": 8})
        for item in args.overrides:
            key, _, value = item.partition("=")
            node = over
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
        cfg = load_task_recipe(REPO / "tasks" / "vqa_2d.yaml", over)
        t0 = time.perf_counter()
        run_finetune(cfg, out / f"seed{seed}", overwrite=True)
        metrics = json.loads((out / f"seed{seed}" / "metrics.json").read_text())
        metrics["bench_time_s"] = time.perf_counter() - t0
        runs.append(metrics)
    vals = [r["val"] for r in runs]
    names = [k for k, v in vals[0].items() if isinstance(v, dict) and "accuracy" in v]
    print(f"\nVQA-RAD val (carved by image from train: {vals[0]['n']} questions), {args.steps} steps, seeds {args.seeds}, "
          f"train time {np.mean([r['train_time_s'] for r in runs]):.0f} s per seed\n")
    print("| answers from | closed accuracy | open accuracy | open token-F1 | open BLEU-1 |")
    print("|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | " + " | ".join(mean_std(v[name].get(s) for v in vals) for s in SCORES) + " |")
    print("\n| image sensitivity (share of answers changed) | mean ± std |\n|---|---|")
    for key in vals[0]["image_sensitivity"]:
        print(f"| {key} | {mean_std(v['image_sensitivity'][key] for v in vals)} |")
    types = sorted(vals[0]["model"]["per_question_type"], key=lambda t: -vals[0]["model"]["per_question_type"][t]["n"])
    shown = [n for n in ("model", "question-only model", "most common answer per question type") if n in names]
    print("\n| question type | n | " + " | ".join(shown) + " |\n|---|---|" + "---|" * len(shown))
    for t in types:
        row = [mean_std(v[n]["per_question_type"][t]["accuracy"] for v in vals) for n in shown]
        print(f"| {t} | {vals[0]['model']['per_question_type'][t]['n']} | " + " | ".join(row) + " |")
    (out / "summary.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
