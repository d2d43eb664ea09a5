"""Task heads, their training modules and evaluation loops: classification, segmentation, report generation."""

from .classification import ClassificationModel, ClassificationTask, evaluate_classification
from .report_generation import ReportGenerator, ReportTask, ReportVocab, build_decoder, evaluate_reports
from .segmentation import SegmentationModel, SegmentationTask, evaluate_segmentation

__all__ = ["ClassificationModel", "ClassificationTask", "evaluate_classification", "SegmentationModel",
           "SegmentationTask", "evaluate_segmentation", "ReportGenerator", "ReportTask", "ReportVocab",
           "build_decoder", "evaluate_reports"]
