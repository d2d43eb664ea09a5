"""Task models and the parts the tasks share, apart from any one task: the :class:`TaskModel` artifact and its
encoder (:func:`build_task_encoder`), the segmentation model (UNETR / U-Net decoders), the text writer
(report and answer decoders) and training parts (known-target loss, layer-decay groups, frozen encoders).
Fine-tuning tasks (:mod:`medfm.finetune`) and pretraining methods (:mod:`medfm.pretrain`) import from here,
never from each other."""

from .segmentation import BACKBONE_FAMILIES, BackboneNetwork, PlannedUNet, SegmentationModel, deep_supervision_weights
from .task_model import TaskModel, build_task_encoder
from .text_writer import ReportVocab, TextWriter, build_decoder, encoder_tokens, writer_head, writer_parts
from .training import FrozenEncoder, encoder_and_head_groups, known_cross_entropy, lr_scaled_groups

__all__ = ["TaskModel", "build_task_encoder", "SegmentationModel", "PlannedUNet", "BackboneNetwork", "BACKBONE_FAMILIES", "deep_supervision_weights", "ReportVocab", "TextWriter", "build_decoder",
           "encoder_tokens", "writer_head", "writer_parts", "FrozenEncoder", "encoder_and_head_groups",
           "known_cross_entropy", "lr_scaled_groups"]
