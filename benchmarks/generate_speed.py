"""Diffusion generator speed: training steps and sampling throughput, 2D and 3D, on this machine.

For each configuration (the recipes' default networks: 2D class-conditioned 32 px and text-conditioned
64 px, 3D mask-conditioned 32^3): training images (volumes) per second over ``--steps`` timed optimizer
steps after a warm-up, and sampled images per second with DDIM (``--sample-steps``, classifier-free
guidance on: two network passes per step). CUDA runs use bf16 autocast. Prints a table naming the device.

    python benchmarks/generate_speed.py --steps 5 --sample-steps 20
"""

from __future__ import annotations

import argparse
import time

import torch

from medfm.generate import DiffusionGenerator, generator_schema
from medfm.run import load_config

CONFIGS = {
    "2D class 32px": dict(spatial_dims=2, image_size=32, conditioning="class", num_classes=2, class_names=["0", "1"]),
    "2D text 64px": dict(spatial_dims=2, image_size=64, conditioning="text", channels=[32, 64, 64],
                         attention=[False, False, True]),
    "3D mask 32^3": dict(spatial_dims=3, image_size=32, conditioning="mask", mask_classes=3, channels=[16, 32, 64],
                         attention=[False, False, True]),
}


def condition(g: DiffusionGenerator, b: int) -> dict:
    if g.conditioning == "class":
        return {"classes": [i % 2 for i in range(b)]}
    if g.conditioning == "text":
        return {"prompts": ["axial CT of the chest with a right lower lobe mass"] * b}
    return {"masks": torch.randint(0, 3, (b, 1) + g.sample_shape[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--batch-2d", type=int, default=64)
    ap.add_argument("--batch-3d", type=int, default=4)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; autocast {'bf16' if dev.type == 'cuda' else 'off (fp32)'}\n")
    print("| configuration | network params | batch | train img/s | sample img/s (DDIM %d, CFG) |" % args.sample_steps)
    print("|---|---|---|---|---|")
    defaults = load_config(generator_schema())["diffusion"]
    for label, kw in CONFIGS.items():
        spec = {**defaults, **kw, "preprocess": {}}
        torch.manual_seed(0)
        g = DiffusionGenerator(spec).to(dev)
        b = args.batch_3d if spec["spatial_dims"] == 3 else args.batch_2d
        opt = torch.optim.AdamW([p for p in g.parameters() if p.requires_grad], lr=1e-4)
        images = torch.rand((b,) + g.sample_shape, device=dev)
        cond = g.condition(**condition(g, b))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

        def step():
            with autocast:
                loss = g.loss(images, cond, cond_dropout=0.1, snr_gamma=5.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        train_rate = args.steps * b / (time.perf_counter() - t0)
        g.eval()
        nb = min(b, 16)
        t0 = time.perf_counter()
        with autocast:
            g.generate(**condition(g, nb), steps=args.sample_steps, guidance_scale=2.0, batch_size=nb)
        sample_rate = nb / (time.perf_counter() - t0)
        params = sum(p.numel() for p in g.network.parameters())
        print(f"| {label} | {params / 1e6:.2f}M | {b} | {train_rate:.1f} | {sample_rate:.2f} |")


if __name__ == "__main__":
    main()
