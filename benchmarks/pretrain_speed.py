"""Pretraining speed: MAE and DINO on ViT-S and ViT-B, 2D (224^2) and 3D (96^3), at a few batch sizes.

For each configuration, in the same process:

* **plain**: a minimal PyTorch loop over the same model and loss (forward, backward,
  AdamW step, LR schedule step, DINO's teacher update; bf16 autocast on CUDA), run
  before and after medfm (plain, medfm, medfm, plain: drift cancels);
* **medfm**: the real recipe path: the method plug-in's ``build_module`` + ``medfm.run.make_trainer`` (Lightning,
  logging, checkpoint callback, NaN guard, RNG state) on the same in-memory batch.

Both see the same fixed batch, so the data pipeline is not timed (see
``synth``/data benchmarks for that). Each configuration is measured ``--repeats`` times (plain, medfm,
plain again each time); reported: training images/s (medians), the step-time ratio medfm/plain (mean and
spread over the repeats; target <= 1.03), with ``--compile`` the same for both paths under
``torch.compile`` (``trainer.compile: true``) and the compiled/uncompiled speed-up, peak memory (CUDA: max allocated; CPU: peak
RSS growth sampled during the run), FLOPs per step (torch's FlopCounterMode on
the plain step) and model FLOP utilisation against the matmul peak measured in
this run (fp32 on CPU, bf16 on CUDA).

    python benchmarks/pretrain_speed.py                       # CPU: small batches, few steps
    python benchmarks/pretrain_speed.py --compile --repeats 3 # on a GPU: 20 steps, compiled columns
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from medfm.encoders import build_encoder
from medfm.pretrain import METHODS, load_recipe
from medfm.run import make_trainer
from medfm.run.module import apply_speed_switches

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def matmul_peak() -> float:
    """Achieved FLOP/s of a large matmul: fp32 on CPU, bf16 on CUDA."""
    n, dtype = (8192, torch.bfloat16) if CUDA else (2048, torch.float32)
    dev = "cuda" if CUDA else "cpu"
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps = 20 if CUDA else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or peak RSS growth sampled every 2 ms on CPU."""

    def __enter__(self):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self._rss()
            self._stop = False
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if CUDA:
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._thread.join()
            self.bytes = self.peak - self.base


def make_batch(cfg: dict, batch: int, device: str) -> dict:
    """One batch of random views of the recipe's sizes (timing does not depend on pixel values)."""
    dims, size = cfg["encoder"]["spatial_dims"], cfg["encoder"]["img_size"]
    if cfg["method"] == "mae":
        return {"image": torch.rand(batch, 1, *([size] * dims), device=device)}
    v = cfg["view"]
    return {"global": [torch.rand(batch, 1, *([size] * dims), device=device) for _ in range(v["n_global"])],
            "local": [torch.rand(batch, 1, *([v["local_size"]] * dims), device=device) for _ in range(v["n_local"])]}


def step_loss(module, batch: dict) -> torch.Tensor:
    if "image" in batch:
        return module.model(batch["image"])["loss"]
    return module.model(batch["global"], batch["local"])[0]


def plain_loop(cfg: dict, batch: dict, steps: int, warmup: int, flops: bool = True) -> tuple[list[float], float, int]:
    """The reference: forward, backward, optimizer + schedule step (+ EMA) in a bare loop (compiled as the
    recipe's ``trainer.compile`` says)."""
    L.seed_everything(0, verbose=False)
    module = METHODS.get_plugin(cfg["method"]).build_module(cfg, build_encoder(cfg["encoder"])).to("cuda" if CUDA else "cpu")
    if cfg["trainer"].get("compile"):
        module.compile_model(cfg["trainer"]["compile"])
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    times = []
    with PeakMemory() as mem:
        for i in range(warmup + steps):
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
                loss = step_loss(module, batch)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if cfg["method"] == "dino":
                module.model.update_teacher(module.current_momentum())
            sync()
            times.append(time.perf_counter() - t)
    if not flops:
        return times[warmup:], 0.0, mem.bytes
    # FLOPs of one training step (forward + backward) of the same model
    with FlopCounterMode(display=False) as fc:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            loss = step_loss(module, batch)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    return times[warmup:], fc.get_total_flops(), mem.bytes


class _StepTimer(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, *args):
        sync()
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, *args):
        sync()
        self.starts.append(time.perf_counter())


class _Fixed(L.LightningDataModule):
    def __init__(self, batch: dict):
        super().__init__()
        self.batch = batch

    def train_dataloader(self):
        batch = self.batch

        class Endless(torch.utils.data.IterableDataset):
            def __iter__(self):
                while True:
                    yield batch

        return torch.utils.data.DataLoader(Endless(), batch_size=None)


def medfm_loop(cfg: dict, batch: dict, steps: int, warmup: int) -> tuple[list[float], int]:
    """The toolkit path: the recipe's module and Trainer (logging, checkpoint callback, NaN guard, RNG state)."""
    L.seed_everything(0, verbose=False)
    cfg = dict(cfg, trainer=dict(cfg["trainer"], max_steps=warmup + steps, enable_progress_bar=False,
                                 checkpoint_every_n_steps=10**6))
    module = METHODS.get_plugin(cfg["method"]).build_module(cfg, build_encoder(cfg["encoder"]))
    apply_speed_switches(module, cfg["trainer"])  # what medfm.run.run does (trainer.compile)
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(cfg["trainer"], Path(out), [timer])  # the run's Trainer, without the export
        with PeakMemory() as mem:
            trainer.fit(module, datamodule=_Fixed(batch))
    times = [b - a for a, b in zip(timer.starts[:-1], timer.starts[1:])]
    return times[warmup:], mem.bytes


def measure(cfg: dict, batch: dict, steps: int, warmup: int, repeats: int, flops: bool) -> dict:
    """``repeats`` x (plain, medfm, medfm, plain): median step times and the per-repeat ratios medfm/plain.

    Each repeat runs the two paths in ABBA order and compares the medians of all their steps, so a drift of the
    machine's speed during the repeat (a shared CPU, clocks, the allocator warming up) hits both alike; taking
    the faster of two plain runs against one medfm run (this script's first design) favours plain by the noise."""
    ours_all, plain_all, ratios, mems, total_flops = [], [], [], [], 0.0
    for r in range(repeats):
        plain, f, _ = plain_loop(cfg, batch, steps, warmup, flops=flops and r == 0)
        ours, mem = medfm_loop(cfg, batch, steps, warmup)
        ours2, _ = medfm_loop(cfg, batch, steps, warmup)
        plain2, _, _ = plain_loop(cfg, batch, steps, warmup, flops=False)
        total_flops = total_flops or f
        ours_all += ours + ours2
        plain_all += plain + plain2
        ratios.append(statistics.median(ours + ours2) / statistics.median(plain + plain2))
        mems.append(mem)
    return {"ours": statistics.median(ours_all), "plain": statistics.median(plain_all), "ratio": statistics.mean(ratios),
            "spread": statistics.pstdev(ratios) if len(ratios) > 1 else 0.0, "mem": max(mems), "flops": total_flops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3 if not CUDA else 20)
    ap.add_argument("--warmup", type=int, default=1 if not CUDA else 5)
    ap.add_argument("--batch-2d", type=int, nargs="+", default=[4, 8] if not CUDA else [64, 128])
    ap.add_argument("--batch-3d", type=int, nargs="+", default=[1, 2] if not CUDA else [4, 8])
    ap.add_argument("--methods", nargs="+", default=["mae", "dino"])
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--models", nargs="+", default=["vit_small", "vit_base"])
    ap.add_argument("--repeats", type=int, default=1, help="plain/medfm/plain measurements per configuration")
    ap.add_argument("--compile", action="store_true", help="also measure both paths under torch.compile")
    args = ap.parse_args()

    peak = matmul_peak()
    device = "cuda" if CUDA else "cpu"
    name = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads, fp32"
    print(f"device: {name}; matmul peak measured here: {peak / 1e12:.3f} TFLOP/s "
          f"({'bf16' if CUDA else 'fp32'}); {args.steps} timed steps after {args.warmup} warm-up; "
          f"{args.repeats} repeat(s)\n")
    header = ("| method | model | input | batch | medfm img/s | plain img/s | medfm/plain step time (mean +- sd) "
              "| peak mem (MiB) | GFLOP/step | TFLOP/s | MFU |")
    if args.compile:
        header += " compiled medfm img/s | compiled medfm/plain | compiled MFU | compile speed-up |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    ratios = []
    for method in args.methods:
        for model in args.models:
            for dims in args.dims:
                cfg = load_recipe(REPO / "encoders" / f"{method}_vit_{dims}d.yaml",
                                  {"encoder": {"name": model}, "trainer": {"log_every_n_steps": 10}})
                for bs in args.batch_2d if dims == 2 else args.batch_3d:
                    batch = make_batch(cfg, bs, device)
                    m = measure(cfg, batch, args.steps, args.warmup, args.repeats, flops=True)
                    ratios.append(m["ratio"])
                    size = cfg["encoder"]["img_size"]
                    row = (f"| {method} | {model} | {size}^{dims} | {bs} | {bs / m['ours']:.2f} | {bs / m['plain']:.2f} "
                           f"| {m['ratio']:.3f} +- {m['spread']:.3f} | {m['mem'] / 2**20:.0f} | {m['flops'] / 1e9:.1f} "
                           f"| {m['flops'] / m['ours'] / 1e12:.3f} | {m['flops'] / m['ours'] / peak:.1%} |")
                    if args.compile:
                        ccfg = dict(cfg, trainer=dict(cfg["trainer"], compile=True))
                        c = measure(ccfg, batch, args.steps, max(args.warmup, 2), args.repeats, flops=False)
                        row += (f" {bs / c['ours']:.2f} | {c['ratio']:.3f} +- {c['spread']:.3f} "
                                f"| {m['flops'] / c['ours'] / peak:.1%} | {m['ours'] / c['ours']:.2f}x |")
                    print(row, flush=True)
    print(f"\nmedfm/plain step-time ratio over the {len(ratios)} uncompiled rows: mean {statistics.mean(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
