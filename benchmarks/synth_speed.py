"""Synthesis speed: is the randomized-synthesis engine ever the bottleneck of pretraining?

For 2D 256^2 and 3D 64^3 / 96^3 / 128^3: samples/s of ``SyntheticDataset`` through
a DataLoader with 1 and 2 workers, against the rate at which the 3D (or 2D) MAE
recipe's training step consumes samples of that size on this machine (ViT-S,
the recipe's model, batch ``--batch``). Ratio = engine / consumption; >= 1 means
the engine keeps up (target: >= 1 with 2 workers for 64^3 on this CPU).

    python benchmarks/synth_speed.py
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from medfm.pretrain import METHODS, build_encoder, load_recipe
from medfm.synthetic import SynthConfig, SyntheticDataset

REPO = Path(__file__).resolve().parents[1]


def engine_rate(dims: int, size: int, workers: int, n: int) -> float:
    ds = SyntheticDataset(SynthConfig(spatial_dims=dims, size=size), seed=0, drop_meta=True)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up is not synthesis
    t = time.perf_counter()
    for _ in itertools.islice(it, n):
        pass
    return n / (time.perf_counter() - t)


def consumption_rate(dims: int, size: int, batch: int, steps: int) -> float:
    """Samples/s that the MAE recipe's training step eats at this size (fp32 CPU / bf16 CUDA)."""
    L.seed_everything(0, verbose=False)
    cfg = load_recipe(REPO / "encoders" / f"mae_vit_{dims}d.yaml", {"encoder": {"img_size": size}})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    module = METHODS.get_plugin(cfg["method"]).build_module(cfg, build_encoder(cfg)).to(dev)
    opt = module.configure_optimizers()["optimizer"]
    x = torch.rand(batch, 1, *([size] * dims), device=dev)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = module.model(x)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch / (sum(times[1:]) / steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=12, help="samples timed per engine configuration")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}; engine: default SynthConfig (8 labels, mixed maps)\n")
    print("| input | MAE step consumes (samples/s) | " + " | ".join(
        f"engine {w} worker{'s' if w > 1 else ''} (samples/s) | ratio" for w in args.workers) + " |")
    print("|---|---|" + "---|---|" * len(args.workers))
    for dims, size in [(2, 256), (3, 64), (3, 96), (3, 128)]:
        # patch 16 needs sides divisible by 16: 256, 64, 96, 128 all are
        need = consumption_rate(dims, size, args.batch, args.steps)
        cells = []
        for w in args.workers:
            r = engine_rate(dims, size, w, args.samples)
            cells += [f"{r:.2f}", f"{r / need:.2f}"]
        print(f"| {size}^{dims} | {need:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
