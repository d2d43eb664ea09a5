"""Fine-tuning recipes (top-level ``tasks/``): the registry of tasks, the schema, and load, run, reload, evaluate.

A task recipe names the ``task`` (a registered plug-in: classification | segmentation | report_generation
| any task module registered with ``@TASKS.register``), the ``encoder`` (random init, or
``encoder.pretrained``: a ``save_pretrained`` folder, a pretraining run, a weight file or ``timm:<name>``),
the adaptation ``method`` (:mod:`medfm.tuning.methods`) and its section, the task's own section, the
data and its splits, the optimizer and the trainer. ``load_task_recipe`` and ``run_finetune`` are the run
layer's one recipe path (:class:`medfm.run.RecipeKind`), which hands it to the task's plug-in and
:func:`medfm.run.run`; RUN then holds:

* ``recipe.yaml`` (resolved), ``run.json``, ``checkpoints/last.ckpt`` (full resume state), ``logs/``;
* ``model/``: the whole task model (adapted encoder + head/decoder) as an artifact folder
  (``config.json`` + ``model.safetensors``) that rebuilds itself: ``medfm.load(RUN)``;
* ``encoder/``: the encoder alone, adaptation merged (LoRA, SSF), with its preprocessing; for LoRA also
  ``adapter/`` (peft's adapter folder alone);
* ``metrics.json``: trainable / total parameters, wall time, and metrics on the validation split and, when
  the data has one, the test split (decision thresholds chosen on validation);
* the task's figures (ROC / confusion matrices, segmentation overlays and NIfTI predictions).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medfm.artifacts import load
from medfm.data import DataError, split_names
from medfm.data.manifest import base_split
from medfm.data.preflight import cross_split_copies
from medfm.data.transforms import PRESETS
from medfm.tuning import METHODS, method_sections
from medfm.run import ENCODER, TRAINER, DataConfig, FreeForm, OptimConfig, RecipeKind, RunFolder
from medfm.run.trainer import TRAINER_DEFAULTS

from .registry import SITE_ADAPTERS, TASKS



@dataclass
class FinetuneDataConfig(DataConfig):
    """``data`` of a task recipe: the shared keys (:class:`medfm.run.DataConfig`) and these."""

    train_split: str = "train"
    val_split: str = "val"
    test_split: str | None = "test"  # evaluated at the end when the data has it (null: never)
    train_from: list[str] = field(default_factory=list)  # more training sets (e.g. `medfm generate` manifests), all rows
    train_real: bool = True  # false: train on train_from only (validation and test still come from path)
    augment: bool = True  # the preset's training augmentation / random crops
    appearance: float = 0.0  # probability of the synthesis engine's random appearance per training image (0: off)


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """``optim`` of a task recipe. ``lr: auto`` is the task's LR for the method (``FinetuneTask.default_lr``),
    resolved when the recipe loads, so ``recipe.yaml`` records the number."""

    lr: float | str = "auto"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SiteAdaptationConfig:
    """``site_adaptation`` section of a task recipe: set by ``medfm adapt`` (null in an ordinary run);
    what it does is in :mod:`medfm.finetune.site_adaptation`."""

    method: str | None = None  # norm | tent | lora_entropy | shot
    source: str | None = None  # the run adapted (its RUN/model is the starting point)
    data: str | None = None  # the target site's data (labels, where it has them, are never read)
    split: str | None = "target"
    params: str = "auto"  # which parameters learn: auto (the method's) | norm | lora | encoder
    shot_beta: float = 0.3  # SHOT: weight of the pseudo-label cross-entropy
    shot_refresh: int = 20  # SHOT: steps between pseudo-label refreshes
    collapse_share: float = 0.9  # a predicted class holding this share of the target (and 5 points more than
    # before adaptation) is a collapse


def finetune_schema() -> dict:
    """Sections of a task recipe: the common ones, the adaptation methods' and every registered task's."""
    return {
        "task": "classification",
        "method": "linear_probe",  # linear_probe | full | lora | vpt | ssf | bitfit
        "seed": 0,
        "shots": None,  # few-shot: K labelled training examples per class (null: all)
        "selection": None,  # a `medfm select` selected.csv: train on its positions of the training split only
        "encoder": ENCODER,
        **method_sections(),
        **TASKS.sections(),
        "site_adaptation": SiteAdaptationConfig,
        "data": FinetuneDataConfig,
        "optim": FinetuneOptimConfig,
        "trainer": FreeForm({**TRAINER_DEFAULTS, "max_steps": 500, "checkpoint_every_n_steps": 200}, accepts=TRAINER.accepts),
    }


def check_task_recipe(cfg: dict) -> None:
    """The task's own checks, the adaptation method, ``optim.lr: auto`` resolved to the task's LR, the preset."""
    plugin = TASKS.get_plugin(cfg["task"])
    plugin.validate(cfg)
    if cfg["method"] not in METHODS:
        raise ValueError(f"unknown method {cfg['method']!r}; available: {', '.join(METHODS)}")
    if isinstance(cfg["optim"]["lr"], str):
        if cfg["optim"]["lr"] != "auto":
            raise ValueError(f"optim.lr must be a number or 'auto', got {cfg['optim']['lr']!r}")
        cfg["optim"]["lr"] = plugin.default_lr(cfg)
    if cfg["data"]["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {cfg['data']['preset']!r}; available: {', '.join(PRESETS)}")


def choose_plugin(cfg: dict):
    """The task's plug-in, or, for a recipe with a ``site_adaptation`` section (``medfm adapt``), the task's
    site-adaptation plug-in: both go through the one recipe path."""
    if not (cfg.get("site_adaptation") or {}).get("method"):
        return TASKS.get_plugin(cfg["task"])
    if cfg["task"] not in SITE_ADAPTERS:
        raise ValueError(f"site adaptation works on {', '.join(SITE_ADAPTERS) or 'no'} runs, not {cfg['task']}")
    return SITE_ADAPTERS[cfg["task"]](cfg["task"])


FINETUNE = RecipeKind(TASKS, "task", finetune_schema, check_task_recipe, folder="tasks", choose=choose_plugin)
load_task_recipe = FINETUNE.load  # the recipe at a path (or the defaults), profile and overrides applied, checked
run_finetune = FINETUNE.run  # fine-tune the recipe's encoder on its task; evaluate; export


def check_splits(cfg: dict) -> None:
    """The training and validation splits must exist in the data: a misspelled name is an error listing the
    data's splits before anything trains (the test split is optional: evaluated when the data has it).
    Called by the task plug-in's ``build``."""
    d = cfg["data"]
    if not d["path"]:
        return
    present = split_names(d["path"])
    for key in ("train_split", "val_split"):
        if base_split(d[key]) not in present:
            raise DataError(f"{d['path']}: no split {d[key]!r} (data.{key}); its splits: {', '.join(present) or 'none'}")
    if d.get("preflight", "auto") is not False:
        bases = [base_split(d[k]) for k in ("train_split", "val_split", "test_split") if d.get(k)]
        splits = [b for b in bases if b in present]  # a fold's copies: those of the split it is cut from
        copies = cross_split_copies(d["path"], list(dict.fromkeys(splits)))
        if copies:
            warnings.warn(f"{d['path']}: the same image is stored in two splits (held-out data also trained on), "
                          f"e.g. {'; '.join(copies[:3])}; `medfm curate` lists every copy and near-copy and writes "
                          "a cleaned copy", stacklevel=2)


def open_split(cfg: dict, split: str | None, train: bool = False, path: str | None = None):
    """One split of a task recipe's data, as its task opens it."""
    return TASKS.get_plugin(cfg["task"]).open_split(cfg, split, train=train, path=path)


def run_recipe(run: str | os.PathLike) -> dict:
    """The resolved recipe of a finished fine-tuning run (a clear error when it is not one)."""
    run = Path(run)
    for f in ("recipe.yaml", "model/config.json", "model/model.safetensors"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run / f}: not a finished fine-tuning run (missing {f})")
    return load_task_recipe(overrides=RunFolder(run).read_recipe(), resolved=True)


def load_run(run: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The fine-tuned task model of a run folder (``RUN/model``, rebuilt by itself; nothing is unpickled)
    and the run's recipe."""
    cfg = run_recipe(run)
    return load(Path(run) / "model"), cfg


def evaluate_run(run: str | os.PathLike, data_path: str | None = None, split: str = "test",
                 out: str | os.PathLike | None = None) -> dict:
    """``FinetuneTask.evaluate`` for the run's task."""
    run = Path(run)
    cfg = run_recipe(run)
    return TASKS.get_plugin(cfg["task"]).evaluate(run, data=data_path, split=split, out=out)
