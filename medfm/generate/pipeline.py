"""Sampling a diffusion generator, apart from the model (diffusers' ``DDPMPipeline`` idea).

:class:`DiffusionPipeline` holds a :class:`medfm.generate.generator.DiffusionGenerator` (network, noise schedule,
conditioning) and a sampler (any of :data:`SAMPLERS`, built from the generator's training schedule), and runs
the reverse process with classifier-free guidance. Every sample ``i`` of a call starts from noise seeded by
``seed + i``, so a file exported with its seed can be regenerated alone, whatever batch it falls in.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from medfm.progress import progress_bar

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


class DiffusionPipeline:
    """``generator`` + a sampler: ``pipeline(classes=... | prompts=... | masks=... | n=...)`` -> samples in [0, 1].
    ``sampler``, ``steps`` and ``guidance_scale`` default to the generator's recipe."""

    def __init__(self, generator, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None):
        spec = generator.spec
        self.generator = generator
        self.sampler = sampler or spec.sampler
        self.steps = steps or spec.sample_steps
        self.guidance_scale = spec.guidance_scale if guidance_scale is None else guidance_scale
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; available: {', '.join(SAMPLERS)}")

    @torch.no_grad()
    def __call__(self, classes: Sequence | torch.Tensor | None = None, prompts: Sequence[str] | None = None,
                 masks: Sequence[torch.Tensor] | torch.Tensor | None = None, n: int | None = None, seed: int = 0,
                 batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Samples in [0, 1], one per class / prompt / mask (or ``n`` for an unconditional generator):
        (B, C, *spatial), spatial = the masks' shape for mask conditioning. The same call gives the same
        tensors."""
        g = self.generator
        cond = g.condition(classes, prompts, masks)
        total = len(next(iter(cond.values()))) if cond else n
        if not total:
            raise ValueError("nothing to generate: give n (unconditional) or at least one condition")
        shape = tuple(cond["mask"].shape[2:]) if "mask" in cond else g.sample_shape[1:]
        if g.autoencoder is not None:  # noise lives on the latent grid
            factor = g.spec.image_size // g.net_spec.image_size
            shape = tuple(s // factor for s in shape)
        channels = g.net_spec.in_chans
        out = []
        batches = -(-total // batch_size)
        bar = progress_bar(total=batches * self.steps, unit="step", disable=not progress,
                   desc=f"sampling {total} in {batches} batch(es) ({self.sampler}, {self.steps} steps)")
        for start in range(0, total, batch_size):
            idx = range(start, min(start + batch_size, total))
            part = {k: v[idx.start:idx.stop] for k, v in cond.items()}
            gens = [torch.Generator().manual_seed(seed + i) for i in idx]
            x = torch.stack([torch.randn((channels, *shape), generator=gen) for gen in gens]).to(g.device)
            out.append(self.denoise(x, part, gens, bar).cpu())
        bar.close()
        return torch.cat(out)

    def denoise(self, x: torch.Tensor, cond: dict, gens: list, bar) -> torch.Tensor:
        """The reverse process from noise ``x`` (one generator per sample), decoded to images in [0, 1]."""
        g = self.generator
        sch = SAMPLERS[self.sampler].from_config(g.scheduler.config)
        sch.set_timesteps(self.steps, device=x.device)
        x = x * sch.init_noise_sigma
        for t in sch.timesteps:
            pred = g.predict(sch.scale_model_input(x, t), t, cond, self.guidance_scale)
            x = sch.step(pred, t, x, generator=gens).prev_sample
            bar.update(1)
        return ((g.from_latent(x).float() + 1) / 2).clamp(0, 1)
