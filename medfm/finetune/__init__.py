"""Fine-tuning: adaptation methods (linear probe, full, LoRA, VPT, SSF, BitFit), few-shot sampling, and the
task plug-ins (classification, segmentation, report generation) run from the recipes in ``tasks/``."""

from . import classify, report, segment  # noqa: F401  (registers the tasks)
from .fewshot import few_shot_indices
from .methods import METHODS, adapt_encoder, count_parameters, export_encoder
from .recipe import TASKS, FinetuneTask, evaluate_run, load_run, load_task_recipe, run_finetune

__all__ = ["METHODS", "TASKS", "FinetuneTask", "adapt_encoder", "count_parameters", "export_encoder",
           "few_shot_indices", "evaluate_run", "load_run", "load_task_recipe", "run_finetune"]
