"""The diffusion generator as a run-layer plug-in (kind ``generate``, method ``diffusion``).

``build`` opens the training set with what the conditioning needs, completes the recipe from it
(classes, mask labels), and returns the generator's :class:`~medfm.generate.module.DiffusionModule`
over step-keyed batches; ``export`` saves ``model/`` with the EMA weights and draws ``samples.png``;
``evaluate`` is ``medfm evaluate RUN`` (:mod:`medfm.generate.evaluate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L

from medfm.run import Built, KeyedDataset, RunFolder, RunPlugin, StepData
from medfm.run.recipe import merge

from .evaluate import draw_conditions, evaluate_generator, summary_lines
from .export import sample_grid
from .generator import DiffusionGenerator
from .module import DiffusionModule
from .recipe import complete_spec, open_training_set
from .registry import GENERATORS
from .spec import DiffusionConfig


def preview_conditions(generator: DiffusionGenerator, train, n: int) -> dict:
    """Conditions for ``n`` preview samples: classes in turn, or the first training prompts / label maps."""
    if generator.conditioning == "class":
        return {"classes": [i % generator.spec.num_classes for i in range(n)]}
    return draw_conditions(generator, train, [i % len(train) for i in range(n)])


@GENERATORS.register
class DiffusionPlugin(RunPlugin):
    """Diffusion generator (DDPM training; DDIM / DPM-Solver sampling), 2D or 3D."""

    name = "diffusion"
    Config = DiffusionConfig
    model_folder = "model"

    def build(self, cfg: dict, folder: RunFolder) -> Built:
        d, s = self.section(cfg, "data"), self.config(cfg)
        train = open_training_set(cfg)
        spec = complete_spec(cfg, train)
        cfg = merge(cfg, {"diffusion": {k: getattr(spec, k) for k in ("num_classes", "class_names", "mask_classes")}})
        generator = DiffusionGenerator(spec)
        n_params = sum(p.numel() for p in generator.network.parameters())
        print(f"diffusion {s.spatial_dims}D, {s.conditioning}-conditioned: {n_params:,} network parameters "
              f"({generator.network.kind}), {len(train)} training images of {tuple(generator.sample_shape)}")
        module = DiffusionModule(generator, cond_dropout=s.cond_dropout, snr_gamma=s.snr_gamma,
                                 ema_decay=s.ema_decay, **cfg["optim"], max_steps=cfg["trainer"]["max_steps"])
        keys = {"class": ("image", "label"), "text": ("image", "text"), "mask": ("image", "mask")}.get(s.conditioning, ("image",))
        keyed = KeyedDataset(train, seed=cfg["seed"], keys=keys)
        data = StepData(keyed, len(train), d.batch_size, d.num_workers, cfg["seed"])
        return Built(module, data, cfg=cfg)

    def export(self, module: DiffusionModule, folder: RunFolder, trainer: L.Trainer, built: Built) -> None:
        """``model/`` (EMA weights) and ``samples.png``."""
        with module.ema_weights():
            g = module.generator.eval()
            folder.save(g, self.model_folder)
            n = g.spec.preview
            if n:
                train = built.data.keyed.dataset
                cond = preview_conditions(g, train, n)
                images = g.generate(**cond, seed=0)
                sample_grid(images, folder / "samples.png", g, cond, title=f"{g.spec.sampler}, {g.spec.sample_steps} steps, "
                            f"guidance {g.spec.guidance_scale}, step {trainer.global_step}")
        module.generator.train()

    evaluate_options = ("data", "split", "out", "n", "features", "classify", "overrides")

    def evaluate(self, run: Path, data: str | None = None, split: str | None = "val", out: str | None = None,
                 n: int | None = None, features: str | None = None, classify: str | None = None,
                 overrides: Sequence[str] = ()) -> dict:
        return evaluate_generator(run, data=data, split=split, out=out, n=n, features=features, classify=classify,
                                  overrides=overrides)

    def summary(self, metrics: dict) -> list[str]:
        return summary_lines(metrics)
