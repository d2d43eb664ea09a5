"""Fine-tuning: adaptation methods (linear probe, full, LoRA, VPT, SSF, BitFit), few-shot sampling, task recipes."""

from .fewshot import few_shot_indices
from .methods import METHODS, adapt_encoder, count_parameters, export_encoder

__all__ = ["METHODS", "adapt_encoder", "count_parameters", "export_encoder", "few_shot_indices"]
