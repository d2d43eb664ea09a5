"""One ``run()`` skeleton for every kind of training run, and the plug-in interface it drives.

A *plug-in* is one pretraining method (MAE, DINO, CLIP, ...) or one fine-tuning task (classification,
segmentation). It declares its recipe section once (``Config``, a dataclass; :mod:`medfm.run.recipe`)
and its needs through hooks:

* ``build(cfg, folder) -> Built``: the LightningModule, the step-keyed data and extra callbacks
  (what data or views it wants is decided here);
* ``before_fit(built, folder, resumed)``: rank 0, before training (e.g. a baseline measurement);
* ``export(module, folder, trainer)``: rank 0, at the end of training: what the run saves (artifact
  folders, figures); the main artifact's sub-folder is ``model_folder``;
* ``after_fit(built, trainer, folder)``: rank 0, after training (evaluation, metrics.json);
* ``evaluate(run, **options)``: ``medfm evaluate RUN`` for a run of this plug-in (``summary``: its
  headline numbers for the console).

``run(plugin, cfg, out)`` does what every run shares: the run folder (refuse to overwrite, resume from
``checkpoints/last.ckpt``), seeding, the Trainer (logs, checkpoints, RNG state, finite-loss guard),
``recipe.yaml`` and ``run.json`` written atomically, fit, export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import lightning as L

from .callbacks import Export
from .folder import RunFolder
from .trainer import make_trainer, quiet_known_noise


@dataclass
class Built:
    """What a plug-in builds for one run: the module to fit, its data, extra callbacks, the recipe
    completed from the data (``cfg``, e.g. the number of classes; written as recipe.yaml) and any state
    its later hooks need."""

    module: L.LightningModule
    data: L.LightningDataModule
    callbacks: list = field(default_factory=list)
    cfg: dict | None = None
    state: dict = field(default_factory=dict)


class RunPlugin:
    """Base of every plug-in (see the module docstring). ``kind`` names the recipe family
    (``pretrain`` | ``finetune``), ``name`` the value that selects it and its recipe section."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    model_folder: ClassVar[str] = "model"

    def config(self, cfg: dict):
        """This plug-in's own recipe section, typed."""
        return self.Config(**cfg[self.name]) if self.Config is not None else None

    def build(self, cfg: dict, folder: RunFolder) -> Built:  # pragma: no cover - abstract
        raise NotImplementedError

    def before_fit(self, built: Built, folder: RunFolder, resumed: bool) -> None:
        pass

    def export(self, module: L.LightningModule, folder: RunFolder, trainer: L.Trainer) -> None:
        pass

    def after_fit(self, built: Built, trainer: L.Trainer, folder: RunFolder) -> None:
        pass

    def evaluate(self, run: Path, **options: Any) -> dict:
        raise NotImplementedError(f"{self.kind} plug-in {self.name!r} has no evaluation")

    def summary(self, metrics: dict) -> list[str]:
        """The headline numbers of ``evaluate``'s metrics, as lines for the console."""
        lines = []
        for key, value in metrics.items():
            if isinstance(value, dict):
                lines.append(f"  {key:<14} " + "  ".join(f"{k} {v:.4f}" for k, v in value.items() if isinstance(v, float)))
            elif isinstance(value, float):
                lines.append(f"  {key:<14} {value:.4f}")
        return lines


class Registry(dict):
    """Plug-ins of one kind by name; ``register`` is the one line a new plug-in file adds."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: type[RunPlugin]) -> type[RunPlugin]:
        if not cls.name:
            raise ValueError(f"{cls.__name__}: a plug-in needs a name")
        if cls.name in self and self[cls.name] is not cls:
            raise ValueError(f"{self.kind} plug-in {cls.name!r} is registered twice")
        cls.kind = self.kind
        self[cls.name] = cls
        return cls

    def get_plugin(self, name: str) -> RunPlugin:
        if name not in self:
            raise ValueError(f"unknown {self.kind} method {name!r}; available: {', '.join(self)}")
        return self[name]()

    def sections(self) -> dict[str, type]:
        """Every registered plug-in's recipe section, by name."""
        return {name: cls.Config for name, cls in self.items() if cls.Config is not None}


def run(plugin: RunPlugin, cfg: dict, out: str | os.PathLike, resume: bool = False,
        callbacks: Sequence[L.Callback] = ()) -> Path:
    """Train as ``cfg`` says with ``plugin``; returns the run folder. ``resume=True`` continues from
    ``out/checkpoints/last.ckpt`` (model, optimizer, scheduler, step, RNG): the resumed run ends with
    the weights an uninterrupted run would have."""
    steps = cfg["trainer"].get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # -1 would train forever, 0 not at all
        raise ValueError(f"trainer.max_steps (--max-steps) must be a whole number >= 1, got {steps!r}")
    quiet_known_noise()
    folder = RunFolder(out)
    ckpt = folder.prepare(resume)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    built = plugin.build(cfg, folder)
    trainer = make_trainer(cfg["trainer"], folder.path, [*built.callbacks, Export(plugin, folder), *callbacks])
    if trainer.is_global_zero:
        folder.write_recipe(built.cfg or cfg)
        folder.write_info(kind=plugin.kind, plugin=plugin.name)
        plugin.before_fit(built, folder, resumed=ckpt is not None)
    trainer.fit(built.module, datamodule=built.data, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.is_global_zero:
        folder.write_info(model=plugin.model_folder)
        plugin.after_fit(built, trainer, folder)
        print(folder.summary_line(plugin.model_folder))
    return folder.path
