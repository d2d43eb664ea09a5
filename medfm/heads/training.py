"""Training parts the task modules share: the loss over known targets, optimizer groups with layer-wise decay
for the encoder, and a frozen encoder that stays in evaluation mode while its head trains."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay

from medfm.encoders import layer_decay_param_groups
from medfm.run import TrainingModule


def known_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the targets that are known (-100: unknown, no loss); a batch without any known
    target gives a zero that keeps the graph (the mean over no target would be NaN)."""
    target = target.to(logits.device)
    if not bool((target != -100).any()):
        return logits.sum() * 0
    return F.cross_entropy(logits.float(), target, ignore_index=-100, label_smoothing=label_smoothing)


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


class FrozenEncoder:
    """Mixin of a task's LightningModule: when ``frozen_encoder`` (a method that freezes it, e.g. the linear
    probe), the encoders of :meth:`frozen_parts` stay in evaluation mode whenever the module trains, so they
    keep their normalisation statistics and apply no dropout."""

    frozen_encoder: bool = False

    def frozen_parts(self) -> list[nn.Module]:
        return [self.encoder] if self.frozen_encoder else []

    def train(self, mode: bool = True):
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self


def lr_scaled_groups(groups: list[dict], scales: dict[int, float], lr: float) -> list[dict]:
    """Each optimizer group split by its parameters' LR scale (``scales``: ``id(param)`` -> scale, 1 when absent),
    the scale recorded as ``lr_scale`` (the schedulers keep it): an encoder or a text tower learning at a fraction
    of the head's LR."""
    out = []
    for g in groups:
        by: dict[float, list] = {}
        for p in g["params"]:
            by.setdefault(scales.get(id(p), 1.0), []).append(p)
        out += [{**g, "params": ps, "lr": lr * s, "lr_scale": s} for s, ps in by.items()]
    return out

