"""Fine-tuning: the tasks, one module each (recipe section, model, training module, metrics and evaluation,
plug-in): classification, segmentation, report generation, visual question answering; their shared base (:mod:`.base`) and the
fine-tuning recipe runner (:mod:`.recipe`) behind ``medfm finetune`` and the recipes in the top-level
``tasks/`` folder. A new task is one module with a ``@TASKS.register`` plug-in, imported here (or by the code
that uses it). The adaptation methods (LoRA, VPT, ...) are :mod:`medfm.adapt`, re-exported here."""

from medfm.adapt import METHODS, adapt_encoder, count_parameters, export_encoder, few_shot_indices

from . import classification, report_generation, segmentation, vqa  # noqa: F401  (registers the tasks)
from .base import FinetuneTask, TaskModel, build_encoder
from .classification import ClassificationModel, ClassificationTask, evaluate_classification
from .recipe import TASKS, evaluate_run, load_run, load_task_recipe, open_split, run_finetune, run_recipe
from .report_generation import ReportGenerator, ReportTask, ReportVocab, build_decoder, evaluate_reports
from .segmentation import SegmentationModel, SegmentationTask, evaluate_segmentation
from .vqa import VQAModel, VQATask, evaluate_vqa

__all__ = ["TASKS", "FinetuneTask", "TaskModel", "build_encoder", "load_task_recipe", "run_finetune", "load_run",
           "evaluate_run", "open_split", "run_recipe", "ClassificationModel", "ClassificationTask",
           "evaluate_classification", "SegmentationModel", "SegmentationTask", "evaluate_segmentation",
           "ReportGenerator", "ReportTask", "ReportVocab", "build_decoder", "evaluate_reports",
           "VQAModel", "VQATask", "evaluate_vqa",
           "METHODS", "adapt_encoder", "count_parameters", "export_encoder", "few_shot_indices"]
