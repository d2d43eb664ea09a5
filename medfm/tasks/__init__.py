"""Task heads and their evaluation loops: classification and segmentation (report generation next)."""

from .classification import ClassificationModel, ClassificationTask, evaluate_classification
from .segmentation import SegmentationModel, SegmentationTask, evaluate_segmentation

__all__ = ["ClassificationModel", "ClassificationTask", "evaluate_classification", "SegmentationModel",
           "SegmentationTask", "evaluate_segmentation"]
