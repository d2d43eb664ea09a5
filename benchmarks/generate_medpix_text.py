"""Text-conditioned diffusion at 64 px on MedPix 2.0 captions: a small-data demonstration.

MedPix 2.0 has ~1,650 training images of every body region, CT and MR, each with a free-text caption:
far too little for text-to-image generation, so this shows the machinery, not a useful generator.
Trains ``generators/diffusion_2d.yaml`` with ``conditioning: text`` (frozen MiniLM token states,
cross-attention UNet) at 64 px on ``train`` (or takes ``--run``); generates one image per ``dev`` caption
(``--n`` of them, drawn at random) and measures whether the caption's modality came through: a classifier trained on
real ``train`` images (CT vs MR, ``tasks/classify_2d.yaml``, small ViT) labels the generated images, beside
its accuracy on the real ``dev`` images of the same captions. Also ``medfm evaluate``'s distances,
diversity and memorisation. Writes ``captions_real_vs_generated.png``.

    python benchmarks/generate_medpix_text.py --manifest ../shared/data/medpix2/manifest.csv --steps 1500
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from medfm.artifacts import load
from medfm.data import open_dataset
from medfm.encoders import preprocess_transform
from medfm.finetune import load_task_recipe, run_finetune
from medfm.generate import export_generated, load_generator_recipe, model_hash, run_generator, sample_grid
from medfm.generate.evaluate import evaluate_generator, summary_lines
from medfm.finetune.classification import evaluate_classification

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--run", default=str(REPO / "runs" / "gen_medpix_text"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--classify-steps", type=int, default=300)
    args = ap.parse_args()
    run = Path(args.run)
    over = {"diffusion": {"conditioning": "text", "image_size": 64, "channels": [32, 64, 64],
                          "attention": [False, False, True], "guidance_scale": 3.0, "sample_steps": args.sample_steps},
            "data": {"text": "caption", "batch_size": args.batch}, "trainer": {"max_steps": args.steps}}
    cfg = load_generator_recipe(REPO / "generators" / "diffusion_2d.yaml", over)
    t0 = time.perf_counter()
    if not (run / "model" / "config.json").exists():
        run_generator(cfg, run, data_path=args.manifest, resume=(run / "checkpoints" / "last.ckpt").exists())
    t_train = time.perf_counter() - t0
    g = load(run)
    dev = open_dataset(args.manifest, split="dev", text_key="caption", label="type",
                       transform=preprocess_transform(g.spec["preprocess"]))
    idx = sorted(np.random.default_rng(0).choice(len(dev), size=min(args.n, len(dev)), replace=False).tolist())  # CT and MR
    gen_dir = run / "dev_captions"
    if not (gen_dir / "manifest.csv").exists():
        export_generated(g, gen_dir, prompts=[dev[i]["text"] for i in idx], seed=0, model=model_hash(run))
    # modality classifier on real train images (CT vs MR), 64 px
    clf = run.parent / (run.name + "_type_classifier")
    if not (clf / "metrics.json").exists():
        c = load_task_recipe(REPO / "tasks" / "classify_2d.yaml", {
            "method": "full", "encoder": {"name": "vit_tiny", "img_size": 64, "patch_size": 8},
            "classification": {"label": "type"}, "data": {"val_split": "dev", "test_split": None, "batch_size": 64},
            "optim": {"lr": 5e-4}, "trainer": {"max_steps": args.classify_steps}})
        run_finetune(c, clf, data_path=args.manifest)
    model = load(clf / "model")
    names = model.spec["head"]["class_names"]
    thr = json.loads((clf / "metrics.json").read_text())["dev"].get("selected_thresholds")
    tf = preprocess_transform(model.spec["preprocess"])
    real_dev = torch.utils.data.Subset(open_dataset(args.manifest, split="dev", label="type", transform=tf), idx)
    # the generated images labelled with the modality of the caption they were generated from
    with open(gen_dir / "manifest.csv", newline="") as f:
        gen_rows = [row["image"] for row in csv.DictReader(f)]
    gen_manifest = gen_dir / "with_type.csv"
    gen_manifest.write_text("image,type\n" + "".join(f"{r},{names[int(dev[i]['label'])]}\n" for r, i in zip(gen_rows, idx)))
    gen_ds = open_dataset(gen_manifest, label="type", classes=names, transform=tf)
    real_res, _ = evaluate_classification(model, real_dev, run, "real_dev", False, names, thr)
    gen_res, _ = evaluate_classification(model, gen_ds, run, "generated_dev", False, names, thr)
    real_imgs = torch.stack([dev[i]["image"] for i in idx[:8]])
    gen_imgs = torch.stack([gen_ds[i]["image"] for i in range(8)])
    sample_grid(torch.cat([real_imgs, gen_imgs]), run / "captions_real_vs_generated.png", g,
                {"prompts": [dev[i]["text"] for i in idx[:8]] * 2}, title="top: real dev image; bottom: generated from its caption")
    m = evaluate_generator(run, data=args.manifest, split="dev", n=args.n, steps=args.sample_steps)
    print(f"\ngenerator {run}: training {t_train:.0f} s this call")
    print("\n".join(summary_lines(m)))
    print("\n| images of %d random dev captions | CT-vs-MR classifier agrees with the caption's modality (accuracy) | AUROC |" % len(idx))
    print("|---|---|---|")
    print(f"| real | {real_res['accuracy']:.3f} | {real_res['auroc']:.3f} |")
    print(f"| generated from the caption | {gen_res['accuracy']:.3f} | {gen_res['auroc']:.3f} |")


if __name__ == "__main__":
    main()
