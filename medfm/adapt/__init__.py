"""Fine-tuning adaptation methods: which encoder parameters train and how the result folds back into a plain
encoder (linear probe, full, LoRA, VPT, SSF, BitFit), and few-shot sampling. The tasks they serve
(classification, segmentation, report generation) and the fine-tuning recipe runner are in
:mod:`medfm.finetune`."""

from .fewshot import few_shot_indices, selected_positions
from .methods import METHOD_SECTIONS, METHODS, adapt_encoder, count_parameters, export_encoder, is_lora

__all__ = ["METHODS", "METHOD_SECTIONS", "adapt_encoder", "count_parameters", "export_encoder", "few_shot_indices",
           "is_lora", "selected_positions"]
