"""Calibration of a classifier's probabilities: expected calibration error, temperature scaling, a
reliability diagram, and selective prediction (what accuracy is left when the least confident cases are
deferred to a person).

ECE is torchmetrics' (``binary_`` / ``multiclass_calibration_error``, 15 equal-width bins, L1): the mean gap
between confidence and accuracy, weighted by how many cases fall in each bin. Temperature scaling (Guo et al.,
"On Calibration of Modern Neural Networks", ICML 2017) divides the logits by one number ``T`` fitted on the
validation split by minimising the negative log-likelihood; it changes no ranking, so AUROC and the argmax stay
as they are, only the probabilities move.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics.functional.classification as tmc

from medfm.figures import pyplot, save_figure


N_BINS = 15
COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def probabilities(logits: torch.Tensor, multi_label: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """Softmax (sigmoid for multi-label) of ``logits / temperature``."""
    z = logits.float() / temperature
    return z.sigmoid() if multi_label else z.softmax(-1)


def calibration_error(probs: torch.Tensor, target: torch.Tensor, multi_label: bool = False,
                      n_bins: int = N_BINS) -> float:
    """Expected calibration error (L1, equal-width bins): of the top label for single-label tasks (binary ones
    too, as in Guo et al. and the reliability diagram), the mean over labels for multi-label ones."""
    probs, target = probs.float().cpu(), target.cpu()
    if multi_label:
        return float(torch.stack([tmc.binary_calibration_error(probs[:, c], target[:, c].long(), n_bins=n_bins)
                                  for c in range(probs.shape[1])]).mean())
    return float(tmc.multiclass_calibration_error(probs.contiguous(), target.long(), num_classes=probs.shape[1],
                                                  n_bins=n_bins))


def negative_log_likelihood(logits: torch.Tensor, target: torch.Tensor, multi_label: bool = False) -> float:
    """Mean negative log-likelihood of ``target`` under ``logits``: what temperature scaling minimises."""
    logits, target = logits.detach().float().cpu(), target.detach().cpu()
    return float(F.binary_cross_entropy_with_logits(logits, target.float()) if multi_label
                 else F.cross_entropy(logits, target.long()))


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, multi_label: bool = False,
                    max_iter: int = 100) -> float:
    """The temperature that minimises the negative log-likelihood of ``target`` (L-BFGS on log T)."""
    logits, target = logits.detach().float().cpu(), target.detach().cpu()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        z = logits / log_t.exp()
        loss = (F.binary_cross_entropy_with_logits(z, target.float()) if multi_label
                else F.cross_entropy(z, target.long()))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(nll)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _confidence_correct(probs: torch.Tensor, target: torch.Tensor, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per decision: the confidence in the predicted class and whether it was right (multi-label: every
    (case, label) decision)."""
    p = probs.float().cpu().numpy()
    y = target.cpu().numpy()
    if multi_label:
        conf = np.maximum(p, 1 - p).ravel()
        correct = ((p >= 0.5) == (y >= 0.5)).ravel()
        return conf, correct
    return p.max(1), p.argmax(1) == y


def reliability_png(probs: torch.Tensor, target: torch.Tensor, path: Path, multi_label: bool = False,
                    title: str = "", n_bins: int = 10) -> Path:
    """Accuracy against confidence per confidence bin (bars), the diagonal of perfect calibration, and how many
    cases each bin holds."""
    conf, correct = _confidence_correct(probs, target, multi_label)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    acc = np.array([correct[which == b].mean() if (which == b).any() else np.nan for b in range(n_bins)])
    count = np.bincount(which, minlength=n_bins)
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(4.5, 5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    centres = (edges[:-1] + edges[1:]) / 2
    ax.bar(centres, np.nan_to_num(acc), width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    bx.bar(centres, count, width=1 / n_bins, color="0.5")
    bx.set_xlabel("confidence")
    bx.set_ylabel("cases")
    return save_figure(fig, path, dpi=110)


def selective_prediction(probs: torch.Tensor, target: torch.Tensor, multi_label: bool = False,
                         coverages=COVERAGES) -> dict:
    """Accuracy (and, for binary tasks, AUROC) on the most confident share of the cases at each coverage, and
    the area under the risk-coverage curve (``aurc``: mean error over all coverages; lower is better)."""
    conf, correct = _confidence_correct(probs, target, multi_label)
    order = np.argsort(-conf, kind="stable")
    risk = 1 - np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    out: dict = {"aurc": float(risk.mean()), "coverage": {}}
    for c in coverages:
        keep = order[: max(1, int(round(c * len(order))))]
        row = {"accuracy": float(correct[keep].mean())}
        if not multi_label and probs.shape[1] == 2:
            y = target.cpu()[torch.as_tensor(keep)]
            row["auroc"] = (float(tmc.binary_auroc(probs[torch.as_tensor(keep), 1].float().cpu(), y.long()))
                            if y.min() != y.max() else None)
        out["coverage"][f"{c:.1f}"] = row
    return out


def selective_png(probs: torch.Tensor, target: torch.Tensor, path: Path, multi_label: bool = False,
                  title: str = "") -> Path:
    """Accuracy of the kept cases against coverage, deferring the least confident first."""
    conf, correct = _confidence_correct(probs, target, multi_label)
    order = np.argsort(-conf, kind="stable")
    acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(np.arange(1, len(order) + 1) / len(order), acc)
    ax.set_xlabel("coverage (share of cases the model decides)")
    ax.set_ylabel("accuracy of those")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=110)
