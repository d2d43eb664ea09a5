"""The segmentation task plug-in: UNETR-style (ViT) or U-Net-style (CNN) decoder, 2D and 3D.

Recipe section ``segmentation`` (:class:`SegmentationConfig`). Training draws random patches of the
encoder's input size; evaluation predicts whole images and volumes with a sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monai.transforms import Compose
from monai.utils import ensure_tuple_rep

from medfm.tasks.segmentation import MaskLabels, SegmentationTask, evaluate_segmentation

from .model import FinetunedSegmenter
from .recipe import TASKS, FinetuneTask


@dataclass
class SegmentationConfig:
    """``segmentation`` recipe section."""

    num_classes: int = 2  # including background (label 0)
    class_names: list | None = None
    mask: str = "mask"  # manifest column of the label maps
    feature_size: int = 16  # decoder width at full resolution (doubles per level)
    overlap: float = 0.25  # sliding-window overlap at evaluation
    sw_batch_size: int = 4
    hd95: bool = True


@TASKS.register
class Segmentation(FinetuneTask):
    name = "segmentation"
    Config = SegmentationConfig
    model_class = FinetunedSegmenter

    def eval_size(self, cfg: dict):
        """3D: the whole resampled volume (sliding window); 2D: the encoder's size."""
        return None if cfg["encoder"]["spatial_dims"] == 3 else cfg["encoder"]["img_size"]

    def transform(self, cfg: dict, train: bool):
        """The preset, after a check of every label map against the recipe's classes (names the file)."""
        preset = super().transform(cfg, train)
        return Compose([MaskLabels(cfg["segmentation"]["num_classes"]), *preset.transforms])

    def split_args(self, cfg: dict, path: str) -> dict:
        if path.lower().endswith(".npz"):
            raise ValueError(f"{path}: segmentation needs a manifest with a mask column, not an npz")
        return {"mask_key": cfg["segmentation"]["mask"]}

    def validate(self, cfg: dict) -> None:
        if cfg["shots"]:
            raise ValueError("shots (few-shot sampling) applies to classification")

    def head(self, cfg: dict) -> dict:
        s = cfg["segmentation"]
        return {"num_classes": s["num_classes"], "feature_size": s["feature_size"], "class_names": s["class_names"]}

    def module(self, cfg: dict, model, train):
        return SegmentationTask(model, frozen_encoder=cfg["method"] == "linear_probe", **self.optim(cfg))

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        s, enc = cfg["segmentation"], cfg["encoder"]
        roi = ensure_tuple_rep(enc["img_size"], enc["spatial_dims"])
        return evaluate_segmentation(model, ds, out, split, roi, s["class_names"], s["overlap"], s["sw_batch_size"],
                                     s["hd95"])
