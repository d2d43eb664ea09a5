"""Promptable segmentation (issue 42): `medfm finetune tasks/promptable_2d.yaml` on a 2D segmentation manifest, as a
new user runs it, scored on its validation split with simulated prompts (a jittered ground-truth box, 1 / 3 / 5
clicks); with ``--volumes``, a 3D manifest is cut into axial slices for training and its validation volumes are
segmented by propagation from one box on each object's middle slice (``medfm segment VOLUME --box ... --slice K``);
with ``--volumes`` and ``--native``, the native 3D recipe (``tasks/promptable_3d.yaml``: a 3D encoder, clicks in the
volume) trains on the volumes and scores 1 / 3 / 5 / 10 clicks per object.

    python benchmarks/promptable.py --data ../shared/data/lgg_flair_seg/manifest.csv --steps 500 --out runs/bench_prompt_lgg
    python benchmarks/promptable.py --data ../shared/data/lgg_flair_seg/manifest.csv --steps 500 \\
        --encoder runs/mae_lgg --out runs/bench_prompt_lgg_mae
    python benchmarks/promptable.py --volumes ../shared/data/msd_hippocampus/manifest.csv --steps 500 \\
        --out runs/bench_prompt_hippo
    python benchmarks/promptable.py --volumes ../shared/data/msd_hippocampus/manifest.csv --native --steps 400 \\
        --out runs/bench_prompt_hippo3d

Prints a markdown table (Dice and NSD per prompt, CPU seconds per image encoding and per prompt, training minutes)
and writes OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medfm.cli import main as medfm
from medfm.finetune.promptable import propagated_scores, slice_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a 2D segmentation manifest")
    ap.add_argument("--volumes", default=None, help="a 3D segmentation manifest: trained on its slices, scored by "
                    "propagation on its validation volumes")
    ap.add_argument("--native", action="store_true", help="with --volumes: tasks/promptable_3d.yaml (clicks in the "
                    "volume) instead of slices and propagation")
    ap.add_argument("--out", default="runs/bench_prompt")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--encoder", default=None, help="pretrained weights (a run, an encoder folder, a checkpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="more recipe overrides, KEY=VALUE")
    args = ap.parse_args()
    out = Path(args.out)
    if bool(args.data) == bool(args.volumes):
        ap.error("give --data (2D) or --volumes (3D)")
    if args.native and not args.volumes:
        ap.error("--native takes --volumes (a 3D manifest)")
    if args.native:
        data = Path(args.volumes).resolve()
    else:
        data = Path(args.data).resolve() if args.data else slice_manifest(Path(args.volumes).resolve(), out / "slices")
    run = out / "run"
    t0 = time.perf_counter()
    recipe = "tasks/promptable_3d.yaml" if args.native else "tasks/promptable_2d.yaml"
    assert medfm(["finetune", recipe, "--data", str(data), "--out", str(run), "--overwrite",
                  "--max-steps", str(args.steps), f"seed={args.seed}", "data.test_split=null",
                  "trainer.enable_progress_bar=false", *(["--encoder", args.encoder] if args.encoder else []),
                  *args.overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    val = metrics["val"]
    lines = [f"# promptable: {data} ({args.steps} steps, encoder {args.encoder or 'random'})", "",
             "| prompt | Dice | NSD (2 px) |", "|---|---|---|"]
    clicks = sorted((k[: -len("_dice")] for k in val if k.startswith("click_") and k.endswith("_dice")),
                    key=lambda s: int(s.split("_")[1]))
    for p in [q for q in ["box", *clicks] if f"{q}_dice" in val]:
        lines.append(f"| {p.replace('_', ' ')} | {val[f'{p}_dice']:.3f} | {val[f'{p}_nsd']:.3f} |")
    if args.native:
        where = (f"objects {val['n']} in {val['n_volumes']} volumes", f"per encoding (one per object) {val['cpu_s_per_encoding']:.3f}",
                 f"per click round {val['cpu_s_per_click_round']:.4f}")
    else:
        where = (f"objects {val['n']} on {val['n_images']} images", f"per image encoding {val['cpu_s_per_image']:.3f}",
                 f"per prompt {val['cpu_s_per_prompt']:.4f}")
    lines += ["", f"{where[0]}; training {metrics['train_time_s'] / 60:.1f} min (wall, {metrics['steps']} steps); CPU s "
              f"{where[1]}, {where[2]}; total {(time.perf_counter() - t0) / 60:.1f} min"]
    per_class = [k for k in val if k.startswith(("box_dice/", "click_")) and "_dice/" in k]
    if per_class:
        lines += ["", "| per class | Dice |", "|---|---|", *[f"| {k} | {val[k]:.3f} |" for k in per_class]]
    if args.volumes and not args.native:
        from medfm.heads.promptable import load_promptable

        prop = propagated_scores(load_promptable(run), Path(args.volumes).resolve())
        lines += ["", "3D by propagation from one box on each object's middle slice (val volumes):", "",
                  "| " + " | ".join(prop) + " |", "|" + "---|" * len(prop),
                  "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in prop.values()) + " |"]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
