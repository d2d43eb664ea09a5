"""The multimodal LM on VQA-RAD: encoders x seeds, the model against the LM alone and its other controls.

``tasks/mllm_2d.yaml`` (ViT-Tiny/8 at 64 px -> mlp2x_gelu -> SmolLM2-135M-Instruct with LoRA, the LM-alone twin
trained beside it) on the official train split minus a validation split carved **by image** (10 % of the
images, seed 0), scored on that split (the official test split is withheld here). Encoders: ``random`` (random
init) and any run or folder given as ``NAME=PATH`` (a medfm MAE run, the MedPix CLIP image tower...). For each
encoder and seed: closed accuracy (a yes/no answer read from its first word), open exact match, open token recall
and F1 of the model, the LM alone zero-shot and fine-tuned (its twin), the model with blank and shuffled images,
and the most common answer; image sensitivity; seconds per training step and per answer. Mean ± std over seeds,
as markdown tables (printed, and written to OUT/results.md).

    python benchmarks/mllm_vqa_rad.py --data ../shared/data/vqa_rad/manifest.csv --steps 300 --seeds 0 1 2 \\
        --encoders random mae=runs/mae2d --out runs/bench_mllm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medfm.data.prepare import carve_split
from medfm.finetune import load_task_recipe, run_finetune
from vqa_rad import mean_std  # the VQA benchmark's mean ± std (benchmarks/ is on the path of a script run from it)

REPO = Path(__file__).resolve().parents[1]
SCORES = ("closed_accuracy", "open_accuracy", "open_token_recall", "open_token_f1")
ANSWERERS = ("model", "lm_only", "lm_zero_shot", "model, blank images", "model, shuffled images", "most common answer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/vqa_rad/manifest.csv")
    ap.add_argument("--out", default="runs/bench_mllm")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoders", nargs="+", default=["random"], help="random, or NAME=RUN_OR_FOLDER")
    ap.add_argument("--eval-limit", type=int, default=None, help="score this many validation questions (default all)")
    ap.add_argument("--language-model", default=None, help="mllm.language_model (default: the packaged SmolLM2)")
    args = ap.parse_args()
    out = Path(args.out)
    manifest = carve_split(args.data, out / "manifest.csv", by="image", fraction=0.1)
    results: dict[str, list[dict]] = {}
    for item in args.encoders:
        name, _, path = item.partition("=")
        for seed in args.seeds:
            encoder = ({"name": "vit_tiny", "img_size": 64, "patch_size": 8} if name == "random" else
                       {"pretrained": path, "img_size": 64})
            cfg = load_task_recipe(REPO / "tasks" / "mllm_2d.yaml", {
                "seed": seed, "encoder": encoder,
                "mllm": {"language_model": args.language_model, "max_length": 128, "eval_limit": args.eval_limit,
                         "eval_batch_size": 16, "generation": {"max_new_tokens": 12}},
                "data": {"path": str(manifest), "test_split": None, "batch_size": 8, "num_workers": 0},
                "optim": {"lr": 2e-4, "warmup_steps": 20},
                "trainer": {"max_steps": args.steps, "checkpoint_every_n_steps": args.steps, "log_every_n_steps": 10}})
            run = run_finetune(cfg, out / f"{name}_seed{seed}", overwrite=True)
            m = json.loads((run / "metrics.json").read_text())
            m["step_s"] = m["train_time_s"] / max(m["steps"], 1)
            results.setdefault(name, []).append(m)
    lines = [f"VQA-RAD validation (carved by image, {results[next(iter(results))][0]['val']['n']} questions), "
             f"{args.steps} steps, seeds {args.seeds}, language model {args.language_model or 'SmolLM2-135M-Instruct'}", ""]
    for name, runs in results.items():
        lines += [f"### encoder: {name}", "", "| answers from | " + " | ".join(SCORES) + " |",
                  "|---|" + "---|" * len(SCORES)]
        for who in ANSWERERS:
            lines.append(f"| {who} | " + " | ".join(mean_std([r["val"][who].get(s) for r in runs]) for s in SCORES) + " |")
        sens = {k: mean_std([r["val"]["image_sensitivity"][k] for r in runs]) for k in runs[0]["val"]["image_sensitivity"]}
        lines += ["", "image sensitivity: " + ", ".join(f"{k} {v}" for k, v in sens.items()),
                  f"seconds per training step (model + twin, batch 8): {mean_std([r['step_s'] for r in runs])}; "
                  f"per answer: {mean_std([r['val']['seconds_per_answer'] for r in runs])}", ""]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
