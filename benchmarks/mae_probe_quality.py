"""Quality check: does MAE pretraining help? Linear-probe AUROC on PneumoniaMNIST, pretrained vs random init.

The encoder is MAE-pretrained on the PneumoniaMNIST ``train`` images (labels
unused) with the ``encoders/mae_vit_2d.yaml`` recipe (shrunk to 32x32 inputs),
then frozen; a logistic-regression probe is fitted on ``train`` features and
scored on the official ``val`` split. The same probe on the same architecture
at random initialisation is the reference. Prints a table; ``--results`` appends
it to benchmarks/RESULTS.md.

    python benchmarks/mae_probe_quality.py --data ../shared/data/pneumoniamnist/pneumoniamnist_trainval.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L

from medfm.data import NpzDataset, radiograph_2d
from medfm.encoders import create_encoder
from medfm.evaluate import embed_dataset, logistic_probe
from medfm.pretrain import load_recipe, run_pretrain

REPO = Path(__file__).resolve().parents[1]


def probe(encoder, data: str) -> dict:
    t = radiograph_2d(size=32)
    train, val = NpzDataset(data, "train", transform=t, cache=True), NpzDataset(data, "val", transform=t, cache=True)
    xt, yt = embed_dataset(encoder, train, batch_size=256)
    xv, yv = embed_dataset(encoder, val, batch_size=256)
    return logistic_probe(xt, yt, xv, yv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="pneumoniamnist_trainval.npz")
    ap.add_argument("--out", default="runs/mae_probe_quality")
    ap.add_argument("--encoder", default="vit_tiny")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    enc_args = {"name": args.encoder, "img_size": 32, "patch_size": 4}
    cfg = load_recipe(REPO / "encoders" / "mae_vit_2d.yaml", {
        "seed": args.seed,
        "encoder": enc_args,
        "mae": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
        "data": {"batch_size": args.batch_size, "num_workers": 1},
        "optim": {"lr": 1.5e-3, "warmup_steps": args.steps // 10},
        "trainer": {"max_steps": args.steps, "log_every_n_steps": 25, "checkpoint_every_n_steps": 500},
        "probe": {"every_n_steps": 0},
    })
    out = Path(args.out)
    resume = (out / "checkpoints" / "last.ckpt").exists()
    t0 = time.perf_counter()
    run_pretrain(cfg, out, data_path=args.data, resume=resume)
    pretrain_s = time.perf_counter() - t0

    L.seed_everything(args.seed, verbose=False)
    kw = dict(spatial_dims=2, img_size=32, patch_size=4)
    rows = []
    for name, enc in [("random init", create_encoder(args.encoder, **kw)),
                      (f"MAE, {args.steps} steps", create_encoder(args.encoder, pretrained=out / "encoder", **kw))]:
        t1 = time.perf_counter()
        m = probe(enc, args.data)
        rows.append((name, m["auroc"], m["accuracy"], m["balanced_accuracy"], time.perf_counter() - t1))
    n_params = sum(p.numel() for p in enc.parameters())
    lines = [
        f"PneumoniaMNIST linear probe (train 3882 -> official val 524), {args.encoder}/4 at 32x32 "
        f"({n_params / 1e6:.1f}M params), logistic regression (L-BFGS) on frozen pooled features; "
        f"MAE pretraining {args.steps} steps x {args.batch_size} on train images, labels unused: {pretrain_s / 60:.1f} min",
        "",
        "| encoder | val AUROC | val accuracy | val balanced acc. | probe time (s) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {a:.4f} | {acc:.4f} | {b:.4f} | {s:.1f} |" for n, a, acc, b, s in rows]
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
