"""Each fast path of a training step measured on and off, in the same process: fused AdamW, fused attention
(``scaled_dot_product_attention``), channels-last convolutions. (``torch.compile``: ``pretrain_speed.py
--compile``.)

Every row times one configuration's training step (forward, backward, AdamW step) with the switch off and on,
alternating ``--repeats`` times so drift on a shared machine hits both; reported: median step time of each and
the speed-up off/on (> 1: the fast path is faster).

* AdamW: torch's per-parameter loop (``foreach=False``, what a CPU run got before: torch picks its
  multi-tensor paths by itself only on CUDA), ``foreach``, and ``fused`` (medfm's default everywhere), on the
  2D MAE recipe's ViT-S step;
* attention: timm's fused path (``F.scaled_dot_product_attention``: flash / memory-efficient kernels on a GPU)
  against the explicit softmax(QK^T)V, in the MAE encoder + decoder, 2D and 3D;
* channels-last (``trainer.channels_last``): ResNet-18 classification steps, 2D and 3D.

    python benchmarks/speed_switches.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
from timm.layers import Attention

from medfm.encoders import build_encoder, create_encoder
from medfm.pretrain import METHODS, load_recipe
from medfm.run.module import to_channels_last

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(step, steps: int, warmup: int) -> float:
    """Median seconds of ``step()`` over ``steps`` calls after ``warmup``."""
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[warmup:])


def mae_step(dims: int, batch: int, model: str = "vit_small", adamw: dict | None = None, fused_attn: bool = True):
    """One training step of the MAE recipe's model (bf16 autocast on CUDA) with the given AdamW / attention."""
    L.seed_everything(0, verbose=False)
    cfg = load_recipe(REPO / "encoders" / f"mae_vit_{dims}d.yaml", {"encoder": {"name": model}})
    module = METHODS.get_plugin("mae").build_module(cfg, build_encoder(cfg["encoder"])).to(DEV)
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused_attn
    groups = module.param_groups()
    opt = torch.optim.AdamW(groups, lr=1e-4, **(adamw or {"fused": True}))
    size = cfg["encoder"]["img_size"]
    x = torch.rand(batch, 1, *([size] * dims), device=DEV)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            loss = module.model(x)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def resnet_step(dims: int, batch: int, size: int, channels_last: bool):
    """One classification step of a ResNet-18 encoder + linear head."""
    torch.manual_seed(0)
    enc = create_encoder("resnet18", spatial_dims=dims, img_size=size)
    model = nn.Sequential(enc, nn.Linear(enc.embed_dim, 2)).to(DEV)
    x = torch.rand(batch, 1, *([size] * dims), device=DEV)
    if channels_last:
        to_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    y = torch.randint(0, 2, (batch,), device=DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def compare(name: str, variants: dict, steps: int, warmup: int, repeats: int) -> None:
    """``variants``: label -> zero-argument builder of a step; the first is the reference (off)."""
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for label, build in variants.items():
            times[label].append(timed(build(), steps, warmup))
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = next(iter(variants))
    cells = " | ".join(f"{k}: {1000 * med[k]:.1f} ms" for k in variants)
    ups = ", ".join(f"{k} {med[ref] / med[k]:.2f}x" for k in list(variants)[1:])
    print(f"| {name} | {cells} | {ups} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3 if not CUDA else 20)
    ap.add_argument("--warmup", type=int, default=1 if not CUDA else 5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-2d", type=int, default=8 if not CUDA else 128)
    ap.add_argument("--batch-3d", type=int, default=2 if not CUDA else 8)
    args = ap.parse_args()
    where = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads, fp32"
    print(f"device: {where}; {args.steps} timed steps after {args.warmup} warm-up, {args.repeats} alternating "
          "repeats, median step time\n")
    print("| step | off / on | speed-up (off / on) |")
    print("|---|---|---|")
    b2, b3, s, w, r = args.batch_2d, args.batch_3d, args.steps, args.warmup, args.repeats
    compare(f"AdamW, MAE ViT-S 224^2 x {b2}", {
        "per-parameter loop": lambda: mae_step(2, b2, adamw={"foreach": False}),
        "foreach": lambda: mae_step(2, b2, adamw={"foreach": True}),
        "fused": lambda: mae_step(2, b2, adamw={"fused": True})}, s, w, r)
    for dims, b in ((2, b2), (3, b3)):
        size = "224^2" if dims == 2 else "96^3"
        compare(f"attention, MAE ViT-S {size} x {b}", {
            "explicit softmax": lambda d=dims, bb=b: mae_step(d, bb, fused_attn=False),
            "fused SDPA": lambda d=dims, bb=b: mae_step(d, bb, fused_attn=True)}, s, w, r)
    for dims, b, size in ((2, b2, 224), (3, b3, 96)):
        compare(f"channels-last, ResNet-18 {size}^{dims} x {b}", {
            "contiguous": lambda d=dims, bb=b, sz=size: resnet_step(d, bb, sz, False),
            "channels-last": lambda d=dims, bb=b, sz=size: resnet_step(d, bb, sz, True)}, s, w, r)


if __name__ == "__main__":
    main()
