"""Mask-conditioned 3D diffusion on the MNI152 brain: do generated volumes match the label maps they were
generated for, including label maps from the synthesis engine?

Trains ``generators/diffusion_3d.yaml`` on random 32^3 crops of the MNI152 T1 at 2 mm with its tissue label
map (0 background, 1 grey matter, 2 white matter; ``medfm.data.samples.mni152_tissue_manifest``), or takes
``--run``. Then generates volumes for (a) ``--n`` MNI label-map crops and (b) ``--n`` label maps of the
randomized-synthesis engine (3 labels, relabelled by size so that the largest is "background"). A
generated volume *matches* its label map when a nearest-class-mean voxel classifier (class means from real
MNI crops) recovers the map: mean Dice over labels, beside the same classifier on the real crops (the
ceiling of this simple test) and on pure-noise volumes (the floor). Prints a table; writes grids.

    python benchmarks/generate_mask3d.py --steps 1500 --n 16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from medfm.artifacts import load
from medfm.data import samples
from medfm.generate import load_generator_recipe, run_generator, sample_grid
from medfm.generate.recipe import open_training_set
from medfm.synthetic import SynthConfig, synth_sample

REPO = Path(__file__).resolve().parents[1]


def class_means(images: torch.Tensor, masks: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([images[masks == c].mean() for c in range(k)])


def nearest_mean_dice(images: torch.Tensor, masks: torch.Tensor, means: torch.Tensor) -> float:
    """Mean Dice over labels of the nearest-class-mean segmentation of ``images`` against ``masks``."""
    pred = (images[..., None] - means).abs().argmin(-1)
    dice = []
    for c in range(len(means)):
        p, t = pred == c, masks == c
        if t.sum() > 0:
            dice.append(float(2 * (p & t).sum() / (p.sum() + t.sum())))
    return float(np.mean(dice))


def engine_masks(n: int, size: int, k: int) -> torch.Tensor:
    """Engine label maps relabelled by voxel count: largest -> 0 (background), then 1, 2 ..."""
    out = []
    for i in range(n):
        m = synth_sample(SynthConfig(spatial_dims=3, size=size, n_labels=k), seed=7, index=i)["mask"].long()
        order = torch.argsort(torch.bincount(m.flatten(), minlength=k), descending=True)
        remap = torch.empty_like(order)
        remap[order] = torch.arange(k)
        out.append(remap[m])
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "gen_mni3d"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=50)
    args = ap.parse_args()
    run = Path(args.run)
    manifest = samples.mni152_tissue_manifest(run.parent / "mni_tissue")
    cfg = load_generator_recipe(REPO / "generators" / "diffusion_3d.yaml", {"trainer": {"max_steps": args.steps}})
    t0 = time.perf_counter()
    if not (run / "model" / "config.json").exists():
        run_generator(cfg, run, data_path=str(manifest), resume=(run / "checkpoints" / "last.ckpt").exists())
    t_train = time.perf_counter() - t0
    g = load(run)
    train = open_training_set(cfg, str(manifest))
    torch.manual_seed(0)
    crops = [train[0] for _ in range(args.n)]  # random crops of the brain (the training transform)
    real = torch.stack([c["image"] for c in crops]).float()
    mni_masks = torch.stack([c["mask"] for c in crops]).round().long()
    k = g.spec.mask_classes
    means = class_means(real, mni_masks, k)
    synth = engine_masks(args.n, g.spec.image_size, k)
    t1 = time.perf_counter()
    gen_mni = g.generate(masks=mni_masks, seed=0, steps=args.sample_steps, batch_size=4)
    t_sample = time.perf_counter() - t1
    gen_syn = g.generate(masks=synth, seed=1000, steps=args.sample_steps, batch_size=4)
    noise = torch.rand_like(real)
    sample_grid(gen_mni[:8], run / "generated_from_mni_masks.png", g, {"masks": list(mni_masks[:8])},
                title="generated from MNI152 tissue label maps (middle slices)")
    sample_grid(gen_syn[:8], run / "generated_from_engine_masks.png", g, {"masks": list(synth[:8])},
                title="generated from synthesis-engine label maps (middle slices)")
    sample_grid(real[:8], run / "real_mni_crops.png", g, {"masks": list(mni_masks[:8])}, title="real MNI152 crops")
    print(f"generator {run}: training {t_train:.0f} s this call; sampling {args.n} volumes in {t_sample:.0f} s "
          f"({args.n / t_sample:.2f} volumes/s, DDIM {args.sample_steps}, guidance {g.spec.guidance_scale})\n")
    print("| volumes | label maps | nearest-class-mean Dice | mean intensity bg / GM / WM |\n|---|---|---|---|")
    for name, vols, masks in (("real MNI152 crops (ceiling)", real, mni_masks),
                              ("generated", gen_mni, mni_masks), ("generated", gen_syn, synth),
                              ("uniform noise (floor)", noise, mni_masks)):
        src = "engine" if masks is synth else "MNI152 tissue"
        m = " / ".join(f"{v:.2f}" for v in class_means(vols, masks, k).tolist())
        print(f"| {name} | {src} | {nearest_mean_dice(vols, masks, means):.3f} | {m} |")


if __name__ == "__main__":
    main()
