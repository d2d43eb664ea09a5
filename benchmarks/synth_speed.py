"""Synthesis speed: is the randomized-synthesis engine ever the bottleneck of pretraining?

For 2D 256^2 and 3D 64^3 / 96^3 / 128^3: samples/s of the per-sample CPU engine (``SyntheticDataset``
through a DataLoader with 1 and 2 workers) and of the batched engine (:mod:`medfm.synthetic.batched`,
``data.synth_device``) rendering ``--engine-batch`` samples at a time on the training device (the GPU when
there is one, else this CPU, in-process), against the rate at which the MAE recipe's training step
consumes samples of that size on that device (ViT-S, the recipe's model, batch ``--batch``). Ratio =
engine / consumption; >= 1 means the engine keeps up. The two are timed separately, one after the other.

    python benchmarks/synth_speed.py
    python benchmarks/synth_speed.py --batch 8 --engine-batch 8 --workers 1 2 8   # on a GPU machine
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from medfm.encoders import build_encoder
from medfm.pretrain import METHODS, load_recipe
from medfm.synthetic import SynthConfig, SyntheticDataset
from medfm.synthetic.batched import synth_batch

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


def batched_rate(dims: int, size: int, batch: int, n: int, device: str) -> float:
    """Samples/s of the batched engine on ``device``, ``batch`` samples per call (the first call not timed)."""
    config = SynthConfig(spatial_dims=dims, size=size)
    synth_batch(config, 0, range(batch), device)
    if device == "cuda":
        torch.cuda.synchronize()
    calls = max(1, n // batch)
    t = time.perf_counter()
    for c in range(calls):
        synth_batch(config, 0, range((c + 1) * batch, (c + 2) * batch), device)
    if device == "cuda":
        torch.cuda.synchronize()
    return calls * batch / (time.perf_counter() - t)


def consumption_rate(dims: int, size: int, batch: int, steps: int) -> float:
    """Samples/s that the MAE recipe's training step eats at this size (fp32 CPU / bf16 CUDA)."""
    L.seed_everything(0, verbose=False)
    cfg = load_recipe(REPO / "encoders" / f"mae_vit_{dims}d.yaml", {"encoder": {"img_size": size}})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    module = METHODS.get_plugin(cfg["method"]).build_module(cfg, build_encoder(cfg["encoder"])).to(dev)
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
    ap.add_argument("--engine-batch", type=int, default=4, help="samples per call of the batched engine")
    ap.add_argument("--sizes", nargs="+", default=["2:256", "3:64", "3:96", "3:128"], help="DIMS:SIZE")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if dev == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; engine: default SynthConfig (8 labels, mixed maps); batched engine "
          f"{args.engine_batch} samples per call on {dev}\n")
    print("| input | MAE step consumes (samples/s) | " + " | ".join(
        f"CPU engine {w} worker{'s' if w > 1 else ''} (samples/s) | ratio" for w in args.workers)
        + f" | batched engine on {dev} (samples/s) | ratio |")
    print("|---|---|" + "---|---|" * (len(args.workers) + 1))
    for dims, size in (tuple(int(v) for v in s.split(":")) for s in args.sizes):
        # patch 16 needs sides divisible by 16: 256, 64, 96, 128 all are
        need = consumption_rate(dims, size, args.batch, args.steps)
        cells = []
        for w in args.workers:
            r = engine_rate(dims, size, w, args.samples)
            cells += [f"{r:.2f}", f"{r / need:.2f}"]
        r = batched_rate(dims, size, args.engine_batch, args.samples, dev)
        cells += [f"{r:.2f}", f"{r / need:.2f}"]
        print(f"| {size}^{dims} | {need:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
