"""Optimizer parameter groups with layer-wise learning-rate decay (BEiT / MAE fine-tuning)."""

from __future__ import annotations

import torch.nn as nn
from timm.optim import param_groups_layer_decay


def layer_decay_param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75
) -> list[dict]:
    """Groups for ``torch.optim.AdamW``: the last layer gets ``lr``, each earlier one ``layer_decay`` times less.

    Layers come from the model's ``group_matcher`` (timm's convention); biases,
    norms and ``no_weight_decay()`` parameters get no weight decay. Each group keeps
    its ``lr_scale`` so a scheduler can rescale it.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return groups
