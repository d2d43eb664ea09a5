"""K-fold cross-validation of a segmentation recipe, and the ensemble of its folds (nnU-Net trains five folds
and predicts with all five).

``medfm finetune RECIPE --folds K --out RUN`` trains ``RUN/fold_0`` .. ``RUN/fold_{K-1}``, each an ordinary run:
fold ``k`` trains on the training split without part ``k`` (the data split ``"train without fold k of K"``,
:func:`medfm.data.manifest.fold_split`) and validates on part ``k``, where it also chooses its post-processing;
the recipe's own validation split is held out from every fold and scores each fold and the ensemble. The
ensemble (:class:`FoldEnsemble`) averages the folds' logits, as nnU-Net does, and keeps the largest-component
filter for the classes a majority of the folds chose it for. ``RUN/folds.json`` records the recipe and the
folds; ``RUN/metrics.json`` the held-out metrics of every fold and of the ensemble; ``medfm predict RUN`` and
``medfm evaluate RUN`` use the ensemble.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from monai.utils import ensure_tuple_rep

from medfm.artifacts import load
from medfm.atomic import write_json
from medfm.data import DataError

from .recipe import open_split, run_finetune, run_recipe
from .segmentation import evaluate_segmentation, run_postprocessing

FOLDS_FILE = "folds.json"


def is_folds_run(run: str | Path) -> bool:
    """Whether ``run`` is the folder of a K-fold run (``medfm finetune --folds K``)."""
    return (Path(run) / FOLDS_FILE).exists()


def fold_recipe(cfg: dict, k: int, folds: int, group: str | None = None) -> dict:
    """Fold ``k`` of ``folds`` of the recipe: trains on its training split without part ``k``, validates on part
    ``k``, and scores the recipe's validation split as its held-out (test) split. ``group``: a manifest column
    whose rows stay together (a patient's slices)."""
    cfg = copy.deepcopy(cfg)
    d = cfg["data"]
    train, held_out, by = d["train_split"], d["val_split"], f" by {group}" if group else ""
    d.update(train_split=f"{train} without fold {k} of {folds}{by}", val_split=f"{train} fold {k} of {folds}{by}",
             test_split=held_out)
    return cfg


def run_folds(cfg: dict, out: str | Path, folds: int, data_path: str | None = None, resume: bool = False,
              overwrite: bool = False, group: str | None = None) -> Path:
    """Train every fold of ``cfg`` into ``out/fold_k`` (a finished fold is kept on ``resume``, a killed one
    resumes from its checkpoint), then score the ensemble on the held-out split; returns ``out``. ``group``: a
    manifest column whose rows are drawn into folds together (2D slices of one patient)."""
    if cfg["task"] != "segmentation":
        raise ValueError(f"--folds trains and ensembles segmentation recipes; this recipe is {cfg['task']}")
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"--folds must be a whole number >= 2, got {folds!r}")
    out = Path(out)
    if data_path:
        cfg = copy.deepcopy(cfg)
        cfg["data"]["path"] = str(data_path)
    if not cfg["data"]["path"]:
        raise ValueError("--folds needs data: give --data MANIFEST")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise FileExistsError(f"{out} exists: --resume to continue its folds, --overwrite to start again")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / FOLDS_FILE, {"folds": folds, "held_out": cfg["data"]["val_split"], "group": group,
                                  "recipe": cfg, "runs": [f"fold_{k}" for k in range(folds)]})
    for k in range(folds):
        sub = out / f"fold_{k}"
        if resume and (sub / "metrics.json").exists():
            print(f"fold {k}: finished earlier, kept")
            continue
        print(f"fold {k} of {folds}: {sub}")
        resumable = resume and (sub / "checkpoints" / "last.ckpt").exists()
        run_finetune(fold_recipe(cfg, k, folds, group), sub, resume=resumable, overwrite=overwrite)
    metrics = evaluate_folds(out)
    print(folds_table(metrics))
    return out


class FoldEnsemble(nn.Module):
    """Several segmentation models of one recipe as one: the mean of their logits (nnU-Net averages its folds'
    logits before the softmax). Takes what :func:`medfm.finetune.segmentation.predict` and ``predict_files``
    read from a task model: ``num_classes`` and ``spec`` (the first fold's: every fold shares the recipe)."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = nn.ModuleList(models)
        self.num_classes, self.spec = models[0].num_classes, models[0].spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.models]).mean(0)


def load_folds(run: str | Path) -> tuple[FoldEnsemble, list[str]]:
    """The ensemble of a K-fold run's finished folds and the classes whose largest component alone it keeps
    (those a majority of the folds' validations chose)."""
    run = Path(run)
    info = json.loads((run / FOLDS_FILE).read_text())
    folders = [run / name for name in info["runs"]]
    missing = [f.name for f in folders if not (f / "model" / "config.json").exists()]
    if missing:
        raise DataError(f"{run}: fold(s) {', '.join(missing)} not finished (medfm finetune ... --folds "
                        f"{info['folds']} --out {run} --resume)")
    chosen = [run_postprocessing(f) for f in folders]
    names = list(dict.fromkeys(n for c in chosen for n in c))
    keep = [n for n in names if 2 * sum(n in c for c in chosen) > len(chosen)]
    return FoldEnsemble([load(f / "model") for f in folders]), keep


def evaluate_folds(run: str | Path, split: str | None = None, data: str | None = None,
                   out: str | Path | None = None) -> dict:
    """The ensemble of a K-fold run scored on ``split`` of ``data`` (default: the held-out split of the run's
    data) beside every fold's own score there; written to ``out`` (default: the run folder) as ``metrics.json``
    with the ensemble's overlay and predictions."""
    run = Path(run)
    info = json.loads((run / FOLDS_FILE).read_text())
    split = split or info["held_out"]
    model, keep = load_folds(run)
    cfg = run_recipe(run / info["runs"][0])
    s, enc = cfg["segmentation"], cfg["encoder"]
    ds = open_split(cfg, split, path=data)
    dest = Path(out) if out else run
    dest.mkdir(parents=True, exist_ok=True)
    roi = ensure_tuple_rep(enc["img_size"], enc["spatial_dims"])
    ensemble = evaluate_segmentation(model.eval(), ds, dest, split, roi, s["class_names"], s["overlap"],
                                     s["sw_batch_size"], s["hd95"], s["mirror"], keep)
    per_fold = {}
    for name in info["runs"]:
        fold_metrics = json.loads((run / name / "metrics.json").read_text())
        if split in fold_metrics and data is None:
            per_fold[name] = fold_metrics[split]
    metrics = {"folds": info["folds"], "split": split, "largest_component": keep, "ensemble": ensemble,
               "per_fold": per_fold}
    write_json(dest / "metrics.json", metrics)
    return metrics


def folds_table(metrics: dict) -> str:
    """Each fold's and the ensemble's held-out mean Dice and Dice per class, as a Markdown table."""
    rows = [*metrics["per_fold"].items(), ("ensemble", metrics["ensemble"])]
    classes = list(metrics["ensemble"]["dice"])
    head = f"| {metrics['split']} | mean Dice | " + " | ".join(classes) + " |"
    lines = [head, "|" + "---|" * (len(classes) + 2)]
    for name, m in rows:
        lines.append(f"| {name} | {m['mean_dice']:.3f} | " + " | ".join(f"{m['dice'][c]:.3f}" for c in classes) + " |")
    return "\n".join(lines)
