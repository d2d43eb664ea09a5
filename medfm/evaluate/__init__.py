"""Evaluation: probes on frozen features, metrics and plots."""

from .probe import embed_dataset, logistic_probe

__all__ = ["embed_dataset", "logistic_probe"]
