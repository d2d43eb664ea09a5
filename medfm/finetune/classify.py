"""The classification task plug-in: binary, multi-class and multi-label heads on the pooled embedding.

Recipe section ``classification`` (:class:`ClassificationConfig`). The number of classes comes from the
training labels when the recipe leaves it open; ``shots`` draws K labelled examples per class; a linear
probe computes the frozen encoder's features once and trains the head on them. Evaluation chooses the
decision thresholds on the validation split (Youden's J) and applies them to the test split.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from medfm.data import DataError, read_rows
from medfm.evaluate.probe import embed_dataset
from medfm.run.recipe import merge
from medfm.tasks.classification import ClassificationTask, class_weights, evaluate_classification

from .fewshot import few_shot_indices
from .model import FinetunedClassifier
from .recipe import TASKS, FinetuneTask


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
class Classification(FinetuneTask):
    name = "classification"
    Config = ClassificationConfig
    model_class = FinetunedClassifier

    def validate(self, cfg: dict) -> None:
        if cfg["classification"]["class_weights"] not in ("auto", "none", None):
            raise ValueError("classification.class_weights must be 'auto' or 'none'")

    def split_args(self, cfg: dict, path: str) -> dict:
        if path.lower().endswith(".npz"):
            return {}
        c = cfg["classification"]
        if not c["label"]:
            raise ValueError("classification on a manifest needs classification.label (the label column)")
        return {"label": c["label"], "classes": c["classes"], "multi_label": c["multi_label"]}

    def extra_split_args(self, cfg: dict, path: str, real) -> dict:
        """A ``train_from`` manifest: its ``label`` column (what `medfm generate` writes) or the recipe's,
        read with the real split's class names (an npz's labels are indices: names "0", "1", ...)."""
        c = cfg["classification"]
        columns = read_rows(path)[0][1] if path.lower().endswith((".csv", ".tsv", ".jsonl")) else {}
        label = "label" if "label" in columns or not c["label"] else c["label"]
        classes = c["classes"] or getattr(real, "classes", None)
        if classes is None and not c["multi_label"]:
            classes = [str(i) for i in range(int(dataset_labels(real).max()) + 1)]
        return {"label": label, "classes": classes, "multi_label": c["multi_label"]}

    def prepare(self, cfg: dict, train):
        labels = dataset_labels(train)
        c = cfg["classification"]
        n = labels.shape[1] if labels.ndim == 2 else int(max(labels.max() + 1, len(getattr(train, "classes", []) or [])))
        cfg = merge(cfg, {"classification": {"num_classes": c["num_classes"] or max(n, 2)}})
        self.idx = None
        if cfg["shots"]:
            self.idx = few_shot_indices(labels, cfg["shots"], cfg["seed"])
            train, labels = Subset(train, self.idx), labels[self.idx]
        self.labels = labels
        self.class_names = [str(x) for x in getattr(train if self.idx is None else train.dataset, "classes", None)
                            or c["classes"] or range(cfg["classification"]["num_classes"])]
        if labels.ndim == 1:
            self.check_label_coverage(cfg, labels)
        return cfg, train

    def check_label_coverage(self, cfg: dict, train_labels: np.ndarray) -> None:
        """Warn about classes the model cannot learn: a training set of one class, and classes that appear in
        the validation or test split but never in training (named, with their rows)."""
        d, names = cfg["data"], self.class_names
        seen = set(np.unique(train_labels).tolist())
        if len(seen) < 2:
            warnings.warn(f"{d['path']}: the training split {d['train_split']!r} holds a single class "
                          f"({names[int(next(iter(seen)))] if seen else 'none'}): the classifier cannot learn to tell classes apart",
                          stacklevel=2)
        for split in (d["val_split"], d["test_split"]):
            try:
                ds = self.open_split(cfg, split, train=False)
            except (DataError, ValueError):
                continue  # a split the data does not have: reported where it is evaluated
            held = dataset_labels(ds)
            for k in sorted(set(np.unique(held).tolist()) - seen):
                rows = np.flatnonzero(held == k)
                where = [ds.describe(int(i)) for i in rows[:3]] if hasattr(ds, "describe") else [f"item {i}" for i in rows[:3]]
                warnings.warn(f"class {names[int(k)]!r} appears in split {split!r} ({len(rows)} row(s): {', '.join(where)}"
                              f"{' ...' if len(rows) > 3 else ''}) but never in the training split {d['train_split']!r}: "
                              "the model cannot learn it", stacklevel=2)

    def train_record(self) -> dict:
        """The rows of a few-shot draw (indices into the training split), so draws can be compared across runs."""
        return {"few_shot_rows": list(self.idx)} if self.idx is not None else {}

    def head(self, cfg: dict) -> dict:
        c = cfg["classification"]
        return {"num_classes": c["num_classes"], "dropout": c["dropout"], "head_norm": c["head_norm"],
                "multi_label": c["multi_label"], "class_names": getattr(self, "class_names", None)}

    def module(self, cfg: dict, model, train):
        c = cfg["classification"]
        weight = None
        if c["class_weights"] == "auto":
            weight = class_weights(torch.as_tensor(self.labels), c["num_classes"], c["multi_label"])
        return ClassificationTask(model, multi_label=c["multi_label"], weight=weight, **self.optim(cfg))

    def default_lr(self, cfg: dict) -> float:
        """A linear probe trains the head alone on cached features, a convex problem that takes a larger LR: at
        1e-3 and 500 steps (4 passes over 3,882 images) it is under-trained (PneumoniaMNIST, all labels, random
        init: val AUROC 0.899 at 1e-3, 0.935 at 1e-2; benchmarks/RESULTS.md, "Label efficiency")."""
        return PROBE_LR if cfg["method"] == "linear_probe" else super().default_lr(cfg)

    def training_set(self, cfg: dict, model, train):
        if cfg["method"] != "linear_probe":
            return train
        # frozen encoder: features computed once, the head trains on them
        plain = self.training_split(cfg, train=False)
        if self.idx is not None:
            plain = Subset(plain, self.idx)
        return _Features(*embed_dataset(model.encoder, plain, progress=f"linear_probe: embedding the {len(plain)} training images once (frozen encoder)"))

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        names = getattr(ds, "classes", None) or model.spec["head"].get("class_names")
        res, thr = evaluate_classification(model, ds, out, split, cfg["classification"]["multi_label"],
                                           [str(n) for n in names] if names else None, state.get("thresholds"),
                                           cfg["data"]["batch_size"])
        if split == state["val_split"] and state.get("thresholds") is None:
            state["thresholds"] = thr
            res["selected_thresholds"] = thr
        return res

    def saved_state(self, val_metrics: dict) -> dict:
        return {"thresholds": val_metrics.get("selected_thresholds")}
