"""Linear probing of frozen features: embed a labelled dataset, fit a logistic regression, score it.

Used as the online probe during pretraining and for the quality checks in
``benchmarks/``. The probe is a multinomial logistic regression trained to
convergence with L-BFGS on standardised features (deterministic: no random
init, no minibatches), scored with torchmetrics (AUROC, accuracy, balanced
accuracy).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics.functional.classification as tmc
from torch.utils.data import Dataset
from medfm.progress import progress_bar

from medfm.data.volume import plain_tensor


@torch.no_grad()
def sample_batches(dataset: Dataset, batch_size: int, device: torch.device | str | None = None,
                   progress: str | None = None, **bar):
    """Consecutive batches of a dataset of sample dicts: ``(items, images)``, the images stacked (on ``device``
    when given); ``progress`` names a progress bar (None: no bar), ``bar`` are its other arguments."""
    for i in progress_bar(range(0, len(dataset), batch_size), desc=progress, disable=progress is None, **bar):
        items = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        images = torch.stack([torch.as_tensor(s["image"]) for s in items])
        yield items, images.to(device) if device is not None else images


def embed_dataset(encoder: nn.Module, dataset: Dataset, batch_size: int = 64,
                  device: torch.device | str | None = None, progress: str | None = None, forward=None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled embeddings (N, D) and labels (N,) or (N, K) (None when the samples have none) of a dataset of
    sample dicts, encoder in eval mode; ``forward`` replaces ``encoder(x)`` (e.g. a CLIP model's
    ``encode_image``); ``progress`` names a progress bar (None: no bar)."""
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    forward = forward or encoder
    feats, labels = [], []
    try:
        for items, x in sample_batches(dataset, batch_size, device, progress, unit="batch"):
            feats.append(forward(x).float().cpu())
            if "label" in items[0]:
                labels.append(torch.stack([torch.as_tensor(s["label"]) for s in items]))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels) if labels else None


def logistic_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                   num_classes: int | None = None, weight_decay: float = 1e-4, max_iter: int = 200) -> dict:
    """Fit a logistic regression on ``train`` features, report on ``val``.

    Returns ``auroc`` (macro, one-vs-rest for more than two classes), ``accuracy``,
    ``balanced_accuracy`` and the ``val_scores`` (N, K) probabilities.
    """
    # plain tensors: MONAI MetaTensor features would drag their metadata through L-BFGS
    train_x, val_x, train_y, val_y = (plain_tensor(t).detach() for t in (train_x, val_x, train_y, val_y))
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xt, xv = (train_x - mean) / std, (val_x - mean) / std
    linear = nn.Linear(xt.shape[1], num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(xt), train_y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        probs = linear(xv).softmax(-1)
    if num_classes == 2:
        auroc = tmc.binary_auroc(probs[:, 1], val_y)
        acc = tmc.binary_accuracy(probs[:, 1], val_y)
        bacc = tmc.multiclass_recall(probs, val_y, num_classes=2, average="macro")
    else:
        auroc = tmc.multiclass_auroc(probs, val_y, num_classes=num_classes, average="macro")
        acc = tmc.multiclass_accuracy(probs, val_y, num_classes=num_classes, average="micro")
        bacc = tmc.multiclass_recall(probs, val_y, num_classes=num_classes, average="macro")
    return {"auroc": float(auroc), "accuracy": float(acc), "balanced_accuracy": float(bacc), "val_scores": probs}
