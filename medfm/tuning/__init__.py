"""Fine-tuning (tuning) methods: which encoder parameters a fine-tuning run trains and how the result folds back
into a plain encoder (linear probe, full, LoRA, VPT, SSF, BitFit, each registered with ``@register_tuning``),
and few-shot sampling. The tasks they serve and the fine-tuning recipe runner are in :mod:`medfm.finetune`;
``medfm adapt`` (adapting a finished run to a new site) is :mod:`medfm.finetune.site_adaptation`."""

from .fewshot import few_shot_indices, selected_positions
from .methods import (METHODS, TuningMethod, adapt_encoder, count_parameters, export_encoder, freezes_encoder, is_lora,
                      method_sections, register_tuning, tuning_method)

__all__ = ["METHODS", "TuningMethod", "register_tuning", "tuning_method", "method_sections", "freezes_encoder",
           "adapt_encoder", "count_parameters", "export_encoder", "few_shot_indices", "is_lora", "selected_positions"]
