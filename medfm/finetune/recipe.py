"""Fine-tuning recipes (top-level ``tasks/``): the schema, the task plug-in base, run, reload, evaluate.

A task recipe names the ``task`` (a registered plug-in: classification | segmentation), the
``encoder`` (random init, or ``encoder.pretrained``: a ``save_pretrained`` folder, a pretraining run, a
weight file or ``timm:<name>``), the adaptation ``method`` (:mod:`medfm.finetune.methods`) and its
section, the task's own section, the data and its splits, the optimizer and the trainer.
``run_finetune`` hands it to the task's plug-in and :func:`medfm.run.run`; RUN then holds:

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

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import lightning as L
import torch

from medfm.artifacts import load
from medfm.atomic import write_json
from medfm.data import DataError, JoinedDataset, open_dataset, split_names
from medfm.data.cache import dataset_cache
from medfm.data.transforms import PRESETS
from medfm.run import ENCODER, TRAINER, Built, FreeForm, KeyedDataset, OptimConfig, Registry, RunFolder, RunPlugin, StepData
from medfm.run import load_config, run
from medfm.run.recipe import adopt_saved_architecture, merge
from medfm.run.trainer import TRAINER_DEFAULTS

from .methods import METHODS, FullConfig, LoRAConfig, VPTConfig, count_parameters, export_encoder, is_lora

TASKS = Registry("finetune")


@dataclass
class FinetuneDataConfig:
    """``data`` of a task recipe."""

    path: str | None = None  # npz or CSV/TSV/JSONL manifest (or give --data)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str | None = "test"  # evaluated at the end when the data has it (null: never)
    train_from: list[str] = field(default_factory=list)  # more training sets (e.g. `medfm generate` manifests), all rows
    train_real: bool = True  # false: train on train_from only (validation and test still come from path)
    preset: str = "radiograph_2d"
    preset_args: dict = field(default_factory=dict)
    augment: bool = True  # the preset's training augmentation / random crops
    batch_size: int = 32
    num_workers: int | str = "auto"  # DataLoader workers: auto = usable cores - 1 (at most 8); capped at the cores
    cache: bool | str = True  # the preprocessed samples: true (in memory) | false | disk (persistent, data.cache_dir)
    cache_dir: str | None = None  # disk cache folder (default $MEDFM_CACHE/preprocessed or ~/.cache/medfm/preprocessed)
    on_error: str = "raise"  # raise: a bad file stops the run naming its row | skip: its row is dropped and counted
    preflight: bool | str = "auto"  # read every file's header before training (auto: manifests up to 5000 rows)


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """``optim`` of a task recipe. ``lr: auto`` is the task's LR for the method (:meth:`FinetuneTask.default_lr`),
    resolved when the recipe loads, so ``recipe.yaml`` records the number."""

    lr: float | str = "auto"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


def finetune_schema() -> dict:
    """Sections of a task recipe: the common ones, the adaptation methods' and every registered task's."""
    return {
        "task": "classification",
        "method": "linear_probe",  # linear_probe | full | lora | vpt | ssf | bitfit
        "seed": 0,
        "shots": None,  # few-shot: K labelled training examples per class (null: all)
        "encoder": ENCODER,
        "full": FullConfig,
        "lora": LoRAConfig,
        "vpt": VPTConfig,
        **TASKS.sections(),
        "data": FinetuneDataConfig,
        "optim": FinetuneOptimConfig,
        "trainer": FreeForm({**TRAINER_DEFAULTS, "max_steps": 500, "checkpoint_every_n_steps": 200}, accepts=TRAINER.accepts),
    }


def load_task_recipe(path: str | os.PathLike | None = None, overrides: Sequence[str] | dict = (),
                     profile: str | None = None) -> dict:
    """The task recipe at ``path`` (or the defaults) with ``overrides`` applied, validated."""
    cfg = load_config(finetune_schema(), path, overrides, profile)
    adopt_saved_architecture(cfg)
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
    return cfg


class FinetuneTask(RunPlugin):
    """Base plug-in of a fine-tuning task. A task supplies its section (``Config``), its artifact class
    (``model_class``), what its manifests must hold (``split_args``), the head (``head``), the
    LightningModule (``module``) and its evaluation (``evaluate_split``); it may reshape the training
    set first (``prepare``: labels, few-shot subsets) and replace it (``training_set``: cached features)."""

    model_class: ClassVar[type]
    keys: ClassVar[tuple[str, ...]] = ("image", "label", "mask", "features")

    def validate(self, cfg: dict) -> None:
        pass

    def default_lr(self, cfg: dict) -> float:
        """``optim.lr: auto``: the LR of the trained part (head, adapter, decoder) for ``cfg['method']``."""
        return 1e-3

    # ------------------------------------------------------------ data
    def transform(self, cfg: dict, train: bool):
        """Training: the preset at the encoder's size with its augmentation/random crop; evaluation: the
        same size without augmentation."""
        d = cfg["data"]
        return PRESETS[d["preset"]](size=self.eval_size(cfg) if not train else cfg["encoder"]["img_size"],
                                    train=train and d["augment"], **d["preset_args"])

    def eval_size(self, cfg: dict):
        return cfg["encoder"]["img_size"]

    def split_args(self, cfg: dict, path: str) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def split_cache(self, cfg: dict, train: bool):
        """``data.cache`` for the sets this task opens (a disk cache keyed by the task, preset and size)."""
        d = cfg["data"]
        return dataset_cache(d["cache"], d["cache_dir"], {"task": cfg["task"], "preset": d["preset"], "train": train,
                                                          "args": d["preset_args"], "size": self.eval_size(cfg),
                                                          "dims": cfg["encoder"]["spatial_dims"]})

    def open_split(self, cfg: dict, split: str | None, train: bool = False, path: str | None = None):
        """One split of the recipe's data with what the task needs (labels, masks)."""
        d = cfg["data"]
        path = str(path or d["path"])
        return open_dataset(path, split=split, spatial_dims=cfg["encoder"]["spatial_dims"],
                            transform=self.transform(cfg, train), cache=self.split_cache(cfg, train), on_error=d["on_error"],
                            preflight=d["preflight"], **self.split_args(cfg, path))

    def extra_split_args(self, cfg: dict, path: str, real) -> dict:
        """How to open a ``train_from`` set so that its labels agree with the real training split's."""
        return self.split_args(cfg, path)

    def training_split(self, cfg: dict, train: bool = True):
        """The training set: the real training split, plus (or, with ``train_real: false``, only) every
        ``train_from`` set, whole."""
        d = cfg["data"]
        real = self.open_split(cfg, d["train_split"], train=train)
        if not d["train_from"]:
            return real
        parts = [real] if d["train_real"] else []
        for p in d["train_from"]:
            parts.append(open_dataset(p, split=None, spatial_dims=cfg["encoder"]["spatial_dims"],
                                      transform=self.transform(cfg, train), cache=self.split_cache(cfg, train), on_error=d["on_error"],
                                      preflight=d["preflight"], **self.extra_split_args(cfg, p, real)))
        return parts[0] if len(parts) == 1 else JoinedDataset(parts)

    def prepare(self, cfg: dict, train) -> tuple[dict, Any]:
        """The recipe completed from the training data, and the training set to use."""
        return cfg, train

    def training_set(self, cfg: dict, model, train):
        return train

    def train_record(self) -> dict:
        """What metrics.json records about the training set beyond its size (classification: the few-shot rows)."""
        return {}

    # ------------------------------------------------------------ model
    def head(self, cfg: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self, cfg: dict) -> dict:
        """What the task model's ``config.json`` holds (see :mod:`medfm.finetune.model`)."""
        return {"task": self.name, "encoder": dict(cfg["encoder"]), "method": cfg["method"],
                "lora": dict(cfg["lora"]), "vpt": dict(cfg["vpt"]), "head": self.head(cfg),
                "preprocess": {"preset": cfg["data"]["preset"], "size": self.eval_size(cfg),
                               "args": dict(cfg["data"]["preset_args"])}}

    def module(self, cfg: dict, model, train) -> L.LightningModule:  # pragma: no cover - abstract
        raise NotImplementedError

    def optim(self, cfg: dict) -> dict:
        return dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"],
                    layer_decay=cfg["full"]["layer_decay"] if cfg["method"] == "full" else None)

    # ------------------------------------------------------------ run hooks
    def build(self, cfg: dict, folder: RunFolder) -> Built:
        d = cfg["data"]
        if not d["path"]:
            raise ValueError("fine-tuning needs data: give --data PATH (an npz or a manifest) or set data.path")
        self.t0 = time.perf_counter()
        cfg, train = self.prepare(cfg, self.training_split(cfg, train=True))
        self.cfg = cfg
        model = self.model_class.from_spec(self.spec(cfg))
        self.trainable, self.total = count_parameters(model)
        print(f"{cfg['task']} / {cfg['method']}: {self.trainable:,} trainable of {self.total:,} parameters "
              f"({100 * self.trainable / self.total:.2f} %), {len(train)} training samples")
        module = self.module(cfg, model, train)
        self.n_train = len(train)
        train = self.training_set(cfg, model, train)
        keyed = KeyedDataset(train, seed=cfg["seed"], keys=self.keys)
        data = StepData(keyed, len(train), d["batch_size"], d["num_workers"], cfg["seed"])
        return Built(module, data, cfg=cfg, state={"model": model})

    def export(self, module, folder: RunFolder, trainer) -> None:
        """``model/`` (the whole task model), ``encoder/`` (plain, merged, with its preprocessing) and, for
        LoRA, ``adapter/`` (peft's adapter folder)."""
        model = module.model
        folder.save(model, "model")
        encoder = export_encoder(model.encoder)
        encoder.preprocess = model.spec["preprocess"]
        folder.save(encoder, "encoder")
        if is_lora(model.encoder):
            model.encoder.save_pretrained(str(folder / "adapter"))

    def after_fit(self, built: Built, trainer, folder: RunFolder) -> None:
        cfg, model = self.cfg, built.state["model"]
        train_time = time.perf_counter() - self.t0
        metrics = {"task": cfg["task"], "method": cfg["method"], "encoder": cfg["encoder"]["name"],
                   "pretrained": cfg["encoder"]["pretrained"], "shots": cfg["shots"], "steps": trainer.global_step,
                   "trainable_params": self.trainable, "total_params": self.total, "n_train": self.n_train,
                   **self.train_record(), "train_time_s": round(train_time, 1)}
        metrics.update(self.evaluate_splits(model, cfg, folder.path))
        metrics["wall_time_s"] = round(time.perf_counter() - self.t0, 1)
        write_json(folder / "metrics.json", metrics)

    # ------------------------------------------------------------ evaluation
    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:  # pragma: no cover
        raise NotImplementedError

    def evaluate_splits(self, model, cfg: dict, out: Path, data_path: str | None = None,
                        splits: Sequence[str] | None = None, state: dict | None = None) -> dict:
        """Metrics and figures for the validation split and the test split where they exist (``splits``:
        only these, and a missing one is an error). ``state`` carries what one split passes to the next
        (classification: thresholds chosen on validation)."""
        d = cfg["data"]
        state = {"val_split": d["val_split"], **(state or {})}
        results: dict = {}
        for split in splits or [s for s in (d["val_split"], d["test_split"]) if s]:
            try:
                ds = self.open_split(cfg, split, path=data_path)
            except DataError as e:
                if splits:  # asked for explicitly
                    raise
                print(f"split {split!r} not evaluated: {e}")
                continue
            if len(ds):
                results[split] = self.evaluate_split(model, ds, cfg, out, split, state)
        return results

    def evaluate(self, run: Path, data: str | None = None, split: str = "test", out: str | None = None,
                 **_: Any) -> dict:
        """Evaluate a finished run on ``split`` of ``data`` (default: the run's data) with what it chose on
        validation; writes ``metrics.json`` and figures into ``out`` (default RUN/eval_<split>)."""
        model, cfg = load_run(run)
        dest = Path(out) if out else run / f"eval_{split}"
        dest.mkdir(parents=True, exist_ok=True)
        val = {}
        if (run / "metrics.json").exists() and split != cfg["data"]["val_split"]:
            # held-out splits use what the run chose on validation; the validation split itself is scored as
            # the run scored it (so `evaluate --split val` reproduces the run's own metrics.json)
            val = json.loads((run / "metrics.json").read_text()).get(cfg["data"]["val_split"], {})
        res = self.evaluate_splits(model, cfg, dest, data_path=data, splits=[split], state=self.saved_state(val))
        metrics = {"run": str(run), "data": str(data or cfg["data"]["path"]), **res}
        write_json(dest / "metrics.json", metrics)
        return metrics

    def summary(self, metrics: dict) -> list[str]:
        """Parameters and wall time, then one line per evaluated split."""
        lines = []
        if "trainable_params" in metrics:
            lines.append(f"{metrics['method']}: {metrics['trainable_params']:,} trainable / "
                         f"{metrics['total_params']:,} parameters, {metrics['wall_time_s']} s")
        for split, v in metrics.items():
            if isinstance(v, dict) and ("auroc" in v or "mean_dice" in v):
                keys = ("auroc", "accuracy", "balanced_accuracy", "f1") if "auroc" in v else ("mean_dice", "mean_hd95")
                lines.append(f"  {split:<8} " + "  ".join(f"{k} {v[k]:.4f}" for k in keys if k in v) + f"  (n={v.get('n')})")
                if "auroc" in v:
                    how = (f"thresholds chosen on validation {[round(t, 3) for t in v['thresholds']]}" if v.get("thresholds")
                           else "threshold 0.5 / argmax")
                    lines[-1] += f"  [{how}]"
        return lines

    def saved_state(self, val_metrics: dict) -> dict:
        """What ``evaluate_splits`` needs from the run's own validation metrics."""
        return {}


def run_finetune(cfg: dict, out: str | os.PathLike, data_path: str | None = None, resume: bool = False,
                 callbacks: Sequence[L.Callback] = (), **run_options: Any) -> Path:
    """Fine-tune the recipe's encoder on its task; evaluate; export. Returns the run folder."""
    if data_path:
        cfg = merge(cfg, {"data": {"path": str(data_path)}})
    check_splits(cfg)
    return run(TASKS.get_plugin(cfg["task"]), cfg, out, resume=resume, callbacks=callbacks, **run_options)


def check_splits(cfg: dict) -> None:
    """The training and validation splits must exist in the data: a misspelled name is an error listing the
    data's splits before anything trains (the test split is optional: evaluated when the data has it)."""
    d = cfg["data"]
    if not d["path"]:
        return
    present = split_names(d["path"])
    for key in ("train_split", "val_split"):
        if d[key] not in present:
            raise DataError(f"{d['path']}: no split {d[key]!r} (data.{key}); its splits: {', '.join(present) or 'none'}")


def open_split(cfg: dict, split: str | None, train: bool = False, path: str | None = None):
    """One split of a task recipe's data, as its task opens it."""
    return TASKS.get_plugin(cfg["task"]).open_split(cfg, split, train=train, path=path)


def run_recipe(run: str | os.PathLike) -> dict:
    """The resolved recipe of a finished fine-tuning run (a clear error when it is not one)."""
    run = Path(run)
    for f in ("recipe.yaml", "model/config.json", "model/model.safetensors"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run / f}: not a finished fine-tuning run (missing {f})")
    return load_task_recipe(overrides=RunFolder(run).read_recipe())


def load_run(run: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The fine-tuned task model of a run folder (``RUN/model``, rebuilt by itself; nothing is unpickled)
    and the run's recipe."""
    cfg = run_recipe(run)
    return load(Path(run) / "model"), cfg


def evaluate_run(run: str | os.PathLike, data_path: str | None = None, split: str = "test",
                 out: str | os.PathLike | None = None) -> dict:
    """:meth:`FinetuneTask.evaluate` for the run's task."""
    run = Path(run)
    cfg = run_recipe(run)
    return TASKS.get_plugin(cfg["task"]).evaluate(run, data=data_path, split=split, out=out)
