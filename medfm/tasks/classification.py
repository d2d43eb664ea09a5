"""Classification on the pooled embedding: binary, multi-class and multi-label, with torchmetrics metrics.

* binary and multi-class: softmax over ``num_classes`` logits, cross-entropy with optional class weights;
* multi-label: one sigmoid per class, binary cross-entropy with optional positive weights.

``class_weights='auto'`` weights classes by inverse frequency in the training
labels (imbalanced sets such as PneumoniaMNIST, 1:9). Metrics: AUROC (macro
and per class), accuracy, balanced accuracy and F1; for binary and multi-label
tasks the decision threshold can be chosen on the validation split
(:func:`select_thresholds`, Youden's J) and then applied to the test split.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics.functional.classification as tmc
from timm.optim import param_groups_weight_decay

from medfm.encoders import layer_decay_param_groups
from medfm.evaluate.plots import confusion_png, roc_png
from medfm.evaluate.probe import embed_dataset
from medfm.run import TrainingModule


class ClassificationModel(nn.Module):
    """``encoder`` -> pooled embedding -> [feature standardisation] -> dropout -> linear head.

    ``standardize`` puts a BatchNorm without affine parameters before the linear layer,
    as MAE's linear probe does: frozen features have arbitrary scales per channel.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


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


class ClassificationTask(TrainingModule):
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


def encoder_and_head_groups(module: TrainingModule, layer_decay: float | None) -> list[dict]:
    """Optimizer groups: with ``layer_decay`` (full fine-tuning), the encoder's layer-wise decayed groups
    (:func:`medfm.encoders.layer_decay_param_groups`) plus the rest at the base LR; otherwise timm's
    weight-decay grouping of every trainable parameter."""
    if not layer_decay or layer_decay >= 1.0 or not hasattr(module.encoder, "group_matcher"):
        return TrainingModule.param_groups(module)
    groups = layer_decay_param_groups(module.encoder, module.lr, module.weight_decay, layer_decay)
    enc_ids = {id(p) for p in module.encoder.parameters()}
    rest = nn.ParameterList([p for p in module.parameters() if id(p) not in enc_ids and p.requires_grad])
    return groups + param_groups_weight_decay(rest, module.weight_decay)


@torch.no_grad()
def evaluate_classification(model: nn.Module, ds, out: Path, split: str, multi_label: bool = False,
                            class_names: list[str] | None = None, thresholds: list[float] | None = None,
                            batch_size: int = 64) -> tuple[dict, list[float] | None]:
    """Scores of ``model`` on the labelled dataset ``ds``; metrics at ``thresholds`` (default 0.5 / argmax)
    plus the Youden thresholds of this split; ``roc_<split>.png`` and ``confusion_<split>.png`` in ``out``."""
    logits, target = embed_dataset(model, ds, batch_size)  # class logits instead of embeddings
    scores = scores_from_logits(logits, multi_label)
    names = class_names or [str(i) for i in range(scores.shape[1])]
    res = classification_metrics(scores, target, multi_label, thresholds, names)
    thr = select_thresholds(scores, target, multi_label)
    roc_png(scores, target, names, out / f"roc_{split}.png", multi_label, title=f"{split}: AUROC {res['auroc']:.3f}")
    if not multi_label:
        k = scores.shape[1]
        pred = (scores[:, 1] >= (thresholds or [0.5])[0]).long() if k == 2 else scores.argmax(1)
        confusion_png(pred, target, names, out / f"confusion_{split}.png",
                      title=f"{split}: accuracy {res['accuracy']:.3f}")
    return res, thr
