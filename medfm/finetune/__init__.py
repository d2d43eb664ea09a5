"""Fine-tuning: the tasks, one module each (recipe section, model, training module, metrics and evaluation,
plug-in): classification, segmentation, promptable (SAM-style) segmentation, report generation, visual question answering; their shared base (:mod:`.base`) and the
fine-tuning recipe runner (:mod:`.recipe`) behind ``medfm finetune`` and the recipes in the top-level
``tasks/`` folder. A new task is one module with a ``@TASKS.register`` plug-in, imported here (or by the code
that uses it). The tuning methods (LoRA, VPT, ...) are :mod:`medfm.tuning`, re-exported here; task models and their
shared parts (segmentation model, text writer) are :mod:`medfm.heads`."""

from medfm.tuning import METHODS, adapt_encoder, count_parameters, export_encoder, few_shot_indices

from . import classification, mllm, promptable, report_generation, segmentation, site_adaptation, vqa  # noqa: F401  (registers the tasks)
from medfm.heads import ReportVocab, SegmentationModel, TaskModel, build_decoder, build_task_encoder

from .base import FinetuneTask
from .classification import ClassificationModel, ClassificationModule, evaluate_classification
from .registry import TASKS, register_task
from .recipe import evaluate_run, load_run, load_task_recipe, open_split, run_finetune, run_recipe
from .report_generation import ReportGenerator, ReportModule, evaluate_reports
from .segmentation import SegmentationModule, evaluate_segmentation
from .vqa import VQAModel, VQAModule, evaluate_vqa

__all__ = ["TASKS", "register_task", "FinetuneTask", "TaskModel", "build_task_encoder", "load_task_recipe", "run_finetune", "load_run",
           "evaluate_run", "open_split", "run_recipe", "ClassificationModel", "ClassificationModule",
           "evaluate_classification", "SegmentationModel", "SegmentationModule", "evaluate_segmentation",
           "ReportGenerator", "ReportModule", "ReportVocab", "build_decoder", "evaluate_reports",
           "VQAModel", "VQAModule", "evaluate_vqa",
           "METHODS", "adapt_encoder", "count_parameters", "export_encoder", "few_shot_indices"]
