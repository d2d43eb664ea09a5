"""The classification task: binary, multi-class and multi-label heads on the pooled embedding, in one module:
its recipe section, model, training module, metrics and evaluation, and plug-in.

* binary and multi-class: softmax over ``num_classes`` logits, cross-entropy with optional class weights;
* multi-label: one sigmoid per class, binary cross-entropy with optional positive weights.

``class_weights='auto'`` weights classes by inverse frequency in the training
labels (imbalanced sets such as PneumoniaMNIST, 1:9). Metrics: AUROC (macro
and per class), accuracy, balanced accuracy and F1; for binary and multi-label
tasks the decision threshold can be chosen on the validation split
(:func:`select_thresholds`, Youden's J) and then applied to the test split.

Recipe section ``classification`` (:class:`ClassificationConfig`). The number of classes comes from the
training labels when the recipe leaves it open; ``shots`` draws K labelled examples per class; a linear
probe computes the frozen encoder's features once and trains the head on them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics.functional.classification as tmc
from torch.utils.data import Dataset, Subset

from medfm.data import DataError, read_rows
from medfm.evaluate.calibration import (calibration_error, fit_temperature, negative_log_likelihood, probabilities,
                                        reliability_png, selective_png, selective_prediction)
from medfm.evaluate.groups import group_report
from medfm.evaluate.plots import confusion_png, roc_png
from medfm.evaluate.probe import embed_dataset
from medfm.tuning import few_shot_indices, selected_positions
from medfm.run import TrainingModule
from medfm.run.recipe import merge

from medfm.heads import TaskModel, build_task_encoder, encoder_and_head_groups

from .base import FinetuneTask
from .registry import TASKS


class ClassificationModel(TaskModel, nn.Module):
    """``encoder`` -> pooled embedding -> [feature standardisation] -> dropout -> linear head.

    ``standardize`` puts a BatchNorm without affine parameters before the linear layer,
    as MAE's linear probe does: frozen features have arbitrary scales per channel. Built by a run from its
    spec (:meth:`from_spec`), it saves and reloads as an artifact (:class:`medfm.finetune.base.TaskModel`).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.0, standardize: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (binary tasks use 2), got {num_classes}")
        self.encoder = encoder
        norm = nn.BatchNorm1d(encoder.embed_dim, affine=False) if standardize else nn.Identity()
        self.head = nn.Sequential(norm, nn.Dropout(dropout), nn.Linear(encoder.embed_dim, num_classes))
        nn.init.trunc_normal_(self.head[-1].weight, std=0.01)
        nn.init.zeros_(self.head[-1].bias)

    temperature: float = 1.0  # logits are divided by it (temperature scaling, fitted on validation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(x))
        return logits if self.temperature == 1.0 else logits / self.temperature

    def set_temperature(self, t: float) -> None:
        """Divide every later output by ``t``; recorded in the spec, so the saved model applies it too."""
        self.temperature = float(t)
        self.spec["head"]["temperature"] = float(t)

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "ClassificationModel":
        h = spec["head"]
        model = cls(build_task_encoder(spec, pretrained), h["num_classes"], h["dropout"], standardize=h["head_norm"])
        model.spec = spec
        model.temperature = float(h.get("temperature", 1.0))  # models saved before calibration: 1
        return model


def class_weights(labels: torch.Tensor, num_classes: int, multi_label: bool) -> torch.Tensor:
    """Inverse-frequency weights: per class for single-label (mean 1), positive weights neg/pos for multi-label."""
    labels = torch.as_tensor(labels)
    if multi_label:
        pos = labels.float().sum(0).clamp_min(1)
        return (len(labels) - pos).clamp_min(1) / pos
    counts = torch.bincount(labels.long(), minlength=num_classes).float().clamp_min(1)
    w = counts.sum() / counts
    return w / w.mean()


def classification_loss(logits: torch.Tensor, target: torch.Tensor, multi_label: bool,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=weight)
    return F.cross_entropy(logits.float(), target.long(), weight=weight)


def scores_from_logits(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Probabilities (N, K): softmax for single-label, sigmoid for multi-label."""
    return logits.float().sigmoid() if multi_label else logits.float().softmax(-1)


def select_thresholds(scores: torch.Tensor, target: torch.Tensor, multi_label: bool) -> list[float] | None:
    """Per-class thresholds maximising Youden's J (sensitivity + specificity - 1) on these (validation) scores;
    None for multi-class (argmax decides)."""
    k = scores.shape[1]
    if not multi_label and k > 2:
        return None
    columns = range(k) if multi_label else [1]
    out = []
    for c in columns:
        y = target[:, c] if multi_label else target
        if y.min() == y.max():  # one class only: keep the default
            out.append(0.5)
            continue
        fpr, tpr, thr = tmc.binary_roc(scores[:, c], y.long())
        best = int(torch.argmax(tpr - fpr))
        out.append(float(thr[best].clamp(0, 1)))
    return out


def classification_metrics(scores: torch.Tensor, target: torch.Tensor, multi_label: bool = False,
                           thresholds: list[float] | None = None, class_names: list[str] | None = None) -> dict:
    """AUROC (macro + per class), accuracy, balanced accuracy, F1 (macro) at ``thresholds`` (default 0.5 /
    argmax), as plain floats for ``metrics.json``."""
    scores, target = scores.float().cpu(), target.cpu()
    k = scores.shape[1]
    names = class_names or [str(i) for i in range(k)]
    out: dict = {"n": len(target)}
    if multi_label:
        t = torch.tensor(thresholds or [0.5] * k)
        pred = (scores >= t).long()
        y = target.long()
        per = tmc.multilabel_auroc(scores, y, num_labels=k, average=None)
        out.update(
            auroc=float(per.nanmean()),
            accuracy=float(tmc.multilabel_accuracy(pred.float(), y, num_labels=k, average="macro")),
            balanced_accuracy=float(((tmc.multilabel_recall(pred.float(), y, num_labels=k, average=None)
                                      + tmc.multilabel_specificity(pred.float(), y, num_labels=k, average=None)) / 2
                                     ).mean()),
            f1=float(tmc.multilabel_f1_score(pred.float(), y, num_labels=k, average="macro")),
        )
    else:
        y = target.long()
        if k == 2:
            thr = (thresholds or [0.5])[0]
            pred = (scores[:, 1] >= thr).long()
            per = torch.stack([tmc.binary_auroc(scores[:, 1], y)] * 2)
        else:
            pred = scores.argmax(1)
            per = tmc.multiclass_auroc(scores, y, num_classes=k, average=None)
        out.update(
            auroc=float(per[0] if k == 2 else per.nanmean()),
            accuracy=float((pred == y).float().mean()),
            balanced_accuracy=float(tmc.multiclass_recall(pred, y, num_classes=k, average="macro")),
            f1=float(tmc.multiclass_f1_score(pred, y, num_classes=k, average="macro")),
        )
    out["auroc_per_class"] = {n: float(v) for n, v in zip(names, per)}
    if thresholds is not None:
        out["thresholds"] = thresholds
    return out


class ClassificationModule(TrainingModule):
    """Lightning module: a :class:`ClassificationModel` trained with (weighted) cross-entropy.

    Batches hold ``image`` and ``label``, or ``features`` (cached pooled embeddings, frozen-encoder
    probes) and ``label``: then only the head runs.
    """

    def __init__(self, model: ClassificationModel, multi_label: bool = False, weight: torch.Tensor | None = None,
                 layer_decay: float | None = None, **optim):
        super().__init__(**optim)
        self.model = model
        self.multi_label = multi_label
        self.layer_decay = layer_decay
        self.register_buffer("weight", weight, persistent=False)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def param_groups(self) -> list[dict]:
        return encoder_and_head_groups(self, self.layer_decay)

    def forward(self, batch: dict) -> torch.Tensor:
        if "features" in batch:
            return self.model.head(batch["features"])
        return self.model(batch["image"])

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self(batch)
        return classification_loss(logits, batch["label"], self.multi_label, self.weight), {}


@torch.no_grad()
def evaluate_classification(model: nn.Module, ds, out: Path, split: str, multi_label: bool = False,
                            class_names: list[str] | None = None, thresholds: list[float] | None = None,
                            batch_size: int = 64, calibrate: bool = False, groups: dict | None = None
                            ) -> tuple[dict, list[float] | None]:
    """Scores of ``model`` on the labelled dataset ``ds``; metrics at ``thresholds`` (default 0.5 / argmax)
    plus the Youden thresholds of this split; calibration (ECE before / after the model's temperature, which
    ``calibrate`` first fits on these cases, and selective prediction); with ``groups`` (column -> one value per
    case), metrics per group and the gaps between them. Figures in ``out``: ``roc_``, ``confusion_``,
    ``calibration_`` (reliability diagram) and ``selective_<split>.png``."""
    logits, target = embed_dataset(model, ds, batch_size)  # class logits instead of embeddings
    if calibrate:
        model.set_temperature(fit_temperature(logits, target, multi_label))
        logits = logits / model.temperature
    t = float(getattr(model, "temperature", 1.0))
    scores = scores_from_logits(logits, multi_label)
    names = class_names or [str(i) for i in range(scores.shape[1])]
    res = classification_metrics(scores, target, multi_label, thresholds, names)
    res.update(temperature=t, ece=calibration_error(scores, target, multi_label),
               ece_uncalibrated=calibration_error(probabilities(logits * t, multi_label), target, multi_label),
               nll=negative_log_likelihood(logits, target, multi_label),
               nll_uncalibrated=negative_log_likelihood(logits * t, target, multi_label),
               selective=selective_prediction(scores, target, multi_label))
    reliability_png(scores, target, out / f"calibration_{split}.png", multi_label,
                    title=f"{split}: ECE {res['ece']:.3f} (T = {t:.2f}; {res['ece_uncalibrated']:.3f} at T = 1)")
    selective_png(scores, target, out / f"selective_{split}.png", multi_label, title=f"{split}: selective prediction")
    if groups and not multi_label:
        thr = (thresholds or [0.5])[0]
        res["groups"] = {col: group_report(scores.numpy(), target.numpy(), values, thr) for col, values in groups.items()}
    thr = select_thresholds(scores, target, multi_label)
    roc_png(scores, target, names, out / f"roc_{split}.png", multi_label, title=f"{split}: AUROC {res['auroc']:.3f}")
    if not multi_label:
        k = scores.shape[1]
        pred = (scores[:, 1] >= (thresholds or [0.5])[0]).long() if k == 2 else scores.argmax(1)
        confusion_png(pred, target, names, out / f"confusion_{split}.png",
                      title=f"{split}: accuracy {res['accuracy']:.3f}")
    return res, thr


# ----------------------------------------------------------------- the plug-in
PROBE_LR = 1e-2  # optim.lr: auto for linear_probe





@dataclass
class ClassificationConfig:
    """``classification`` recipe section."""

    label: str | list | None = None  # manifest label column(s) (npz: its labels)
    classes: list | None = None  # class names in index order (default: the sorted values of the column)
    multi_label: bool = False
    num_classes: int | None = None  # null: from the training labels
    class_weights: str | None = "auto"  # auto (inverse frequency) | none
    dropout: float = 0.0
    head_norm: bool = True  # standardise features (BatchNorm, no affine) before the linear head
    temperature_scaling: bool = True  # fit a temperature on validation, stored with the model (calibration)


def group_columns(ds, columns: list[str] | None) -> dict[str, list[str]] | None:
    """Each of ``columns`` as one value per case of the manifest dataset ``ds`` (``--groups``); an npz or a
    column the manifest lacks is an error naming what there is."""
    if not columns:
        return None
    if not hasattr(ds, "records"):
        raise DataError(f"{getattr(ds, 'path', ds)}: groups (--groups) come from manifest columns; an npz has none")
    rows = dict(read_rows(ds.manifest))
    present = sorted(set().union(*(r.keys() for r in rows.values())))
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{ds.manifest}: no column {', '.join(map(repr, missing))} for --groups; columns are {present}")
    return {c: [str(rows[r.line].get(c, "") or "(empty)") for r in ds.records] for c in columns}


def dataset_labels(ds) -> np.ndarray:
    """All labels of a labelled dataset without loading images: (N,) ints or (N, K) multi-hot."""
    if hasattr(ds, "datasets"):  # joined training sets
        return np.concatenate([dataset_labels(part) for part in ds.datasets])
    if getattr(ds, "labels", None) is not None:  # npz
        return np.asarray(ds.targets)
    if hasattr(ds, "records"):
        missing = next((r for r in ds.records if r.label is None), None)
        if missing is not None:
            raise DataError(f"{ds.manifest} line {missing.line}: no label")
        return np.stack([np.asarray(r.label) for r in ds.records])
    raise DataError(f"{ds}: has no labels")


class _Features(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.features[i], "label": self.labels[i]}


@TASKS.register
class ClassificationTask(FinetuneTask):
    name = "classification"
    evaluate_options = (*FinetuneTask.evaluate_options, "groups")
    Config = ClassificationConfig
    model_class = ClassificationModel
    headline = ("auroc", "accuracy", "balanced_accuracy", "f1")
    few_shot = True

    def evaluate(self, run: Path, data: str | None = None, split: str = "test", out: str | None = None,
                 groups: list[str] | None = None, robustness: str | None = None) -> dict:
        """:meth:`FinetuneTask.evaluate`, and ``groups``: manifest columns to report metrics per group by
        (site, scanner, sex: per-group metrics, the worst group, bootstrap gaps)."""
        return self.run_evaluation(run, data, split, out, robustness, groups=list(groups or []))

    def validate(self, cfg: dict) -> None:
        super().validate(cfg)
        if self.config(cfg).class_weights not in ("auto", "none", None):
            raise ValueError("classification.class_weights must be 'auto' or 'none'")

    def split_args(self, cfg: dict, path: str) -> dict:
        if path.lower().endswith(".npz"):
            return {}
        c = self.config(cfg)
        if not c.label:
            raise ValueError("classification on a manifest needs classification.label (the label column)")
        return {"label": c.label, "classes": c.classes, "multi_label": c.multi_label}

    def extra_split_args(self, cfg: dict, path: str, real) -> dict:
        """A ``train_from`` manifest: its ``label`` column (what `medfm generate` writes) or the recipe's,
        read with the real split's class names (an npz's labels are indices: names "0", "1", ...)."""
        c = self.config(cfg)
        columns = read_rows(path)[0][1] if path.lower().endswith((".csv", ".tsv", ".jsonl")) else {}
        label = "label" if "label" in columns or not c.label else c.label
        classes = c.classes or getattr(real, "classes", None)
        if classes is None and not c.multi_label:
            classes = [str(i) for i in range(int(dataset_labels(real).max()) + 1)]
        return {"label": label, "classes": classes, "multi_label": c.multi_label}

    def prepare(self, cfg: dict, train, state: dict):
        """The number of classes from the labels, the few-shot draw (``state["idx"]``), the training labels and
        class names."""
        labels = dataset_labels(train)
        c = self.config(cfg)
        n = labels.shape[1] if labels.ndim == 2 else int(max(labels.max() + 1, len(getattr(train, "classes", []) or [])))
        cfg = merge(cfg, {"classification": {"num_classes": c.num_classes or max(n, 2)}})
        idx = None
        if cfg["shots"] and cfg.get("selection"):
            raise ValueError("give shots (a random draw of K per class) or selection (chosen items), not both")
        if cfg["shots"]:
            idx = few_shot_indices(labels, cfg["shots"], cfg["seed"])
        elif cfg.get("selection"):
            idx = selected_positions(cfg["selection"], len(train))
        if idx is not None:
            train, labels = Subset(train, idx), labels[idx]
        names = [str(x) for x in getattr(train if idx is None else train.dataset, "classes", None)
                 or c.classes or range(self.config(cfg).num_classes)]
        state.update(idx=idx, labels=labels, class_names=names)
        if labels.ndim == 1:
            self.check_label_coverage(cfg, labels, names)
        return cfg, train

    def check_label_coverage(self, cfg: dict, train_labels: np.ndarray, names: list[str]) -> None:
        """Warn about classes the model cannot learn: a training set of one class, and classes that appear in
        the validation or test split but never in training (named, with their rows)."""
        d = self.section(cfg, "data")
        seen = set(np.unique(train_labels).tolist())
        if len(seen) < 2:
            warnings.warn(f"{d.path}: the training split {d.train_split!r} holds a single class "
                          f"({names[int(next(iter(seen)))] if seen else 'none'}): the classifier cannot learn to tell classes apart",
                          stacklevel=2)
        for split in (d.val_split, d.test_split):
            try:
                ds = self.open_split(cfg, split, train=False)
            except (DataError, ValueError):
                continue  # a split the data does not have: reported where it is evaluated
            held = dataset_labels(ds)
            for k in sorted(set(np.unique(held).tolist()) - seen):
                rows = np.flatnonzero(held == k)
                where = [ds.describe(int(i)) for i in rows[:3]] if hasattr(ds, "describe") else [f"item {i}" for i in rows[:3]]
                warnings.warn(f"class {names[int(k)]!r} appears in split {split!r} ({len(rows)} row(s): {', '.join(where)}"
                              f"{' ...' if len(rows) > 3 else ''}) but never in the training split {d.train_split!r}: "
                              "the model cannot learn it", stacklevel=2)

    def train_record(self, state: dict) -> dict:
        """The rows of a few-shot draw (indices into the training split), so draws can be compared across runs."""
        return {"few_shot_rows": list(state["idx"])} if state.get("idx") is not None else {}

    def head(self, cfg: dict, state: dict) -> dict:
        c = self.config(cfg)
        return {"num_classes": c.num_classes, "dropout": c.dropout, "head_norm": c.head_norm,
                "multi_label": c.multi_label, "class_names": state.get("class_names")}

    def module(self, cfg: dict, model, train, state: dict):
        c = self.config(cfg)
        weight = None
        if c.class_weights == "auto":
            weight = class_weights(torch.as_tensor(state["labels"]), c.num_classes, c.multi_label)
        return ClassificationModule(model, multi_label=c.multi_label, weight=weight, **self.optim(cfg))

    def default_lr(self, cfg: dict) -> float:
        """A linear probe trains the head alone on cached features, a convex problem that takes a larger LR: at
        1e-3 and 500 steps (4 passes over 3,882 images) it is under-trained (PneumoniaMNIST, all labels, random
        init: val AUROC 0.899 at 1e-3, 0.935 at 1e-2; benchmarks/RESULTS.md, "Label efficiency")."""
        return PROBE_LR if self.frozen_encoder(cfg) else super().default_lr(cfg)

    def training_set(self, cfg: dict, model, train, state: dict):
        if not self.frozen_encoder(cfg):
            return train
        # frozen encoder: features computed once, the head trains on them
        plain = self.training_split(cfg, train=False)
        if state.get("idx") is not None:
            plain = Subset(plain, state["idx"])
        return _Features(*embed_dataset(model.encoder, plain, progress=f"linear_probe: embedding the {len(plain)} training images once (frozen encoder)"))

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        names = getattr(ds, "classes", None) or model.spec["head"].get("class_names")
        # temperature scaling: fitted once, on the validation split of the run itself (a reloaded model has it)
        calibrate = (split == state["val_split"] and self.config(cfg).temperature_scaling
                     and getattr(model, "temperature", 1.0) == 1.0)
        res, thr = evaluate_classification(model, ds, out, split, self.config(cfg).multi_label,
                                           [str(n) for n in names] if names else None, state.get("thresholds"),
                                           self.section(cfg, "data").batch_size, calibrate=calibrate,
                                           groups=group_columns(ds, state.get("groups")))
        if split == state["val_split"] and state.get("thresholds") is None:
            state["thresholds"] = thr
            res["selected_thresholds"] = thr
        return res

    def after_fit(self, built, trainer, folder) -> None:
        """Evaluation as every task does it; then the model is saved again when validation fitted its
        temperature, so that ``model/`` applies it at prediction."""
        super().after_fit(built, trainer, folder)
        model = built.state["model"]
        if getattr(model, "temperature", 1.0) != 1.0:
            folder.save(model, "model")

    def summary(self, metrics: dict) -> list[str]:
        """The headline lines, then calibration and, with ``--groups``, the worst group and the largest gap."""
        lines = super().summary(metrics)
        for split, v in metrics.items():
            if not isinstance(v, dict) or "ece" not in v:
                continue
            lines.append(f"  {split:<8} ECE {v['ece']:.4f} (temperature {v['temperature']:.2f}; "
                         f"{v['ece_uncalibrated']:.4f} without)  accuracy at 80 % coverage "
                         f"{v['selective']['coverage']['0.8']['accuracy']:.4f}")
            for col, g in v.get("groups", {}).items():
                if not g["gap"]:
                    lines.append(f"  {split:<8} by {col}: {len(g['groups'])} groups, fewer than two of "
                                 f"{g['min_size']}+ cases to compare")
                for m, gap in g["gap"].items():
                    worst = g["worst"][m]
                    lines.append(f"  {split:<8} by {col}: {m} worst {worst['group']} {worst['value']:.4f}, gap "
                                 f"{gap['value']:.4f} (95 % CI {gap['ci95'][0]:.4f}-{gap['ci95'][1]:.4f}) "
                                 f"over {len(g['groups'])} groups")
        return lines

    def summary_note(self, v: dict) -> str:
        how = (f"thresholds chosen on validation {[round(t, 3) for t in v['thresholds']]}" if v.get("thresholds")
               else "threshold 0.5 / argmax")
        return f"  [{how}]"

    def saved_state(self, val_metrics: dict) -> dict:
        return {"thresholds": val_metrics.get("selected_thresholds")}
