"""Fine-tuned task models as artifacts: a folder with ``config.json`` + ``model.safetensors`` that rebuilds
the adapted encoder and its head by itself (:func:`medfm.load`), with no recipe.

``config.json`` holds the *spec*: the encoder's recipe section (without its pretrained weights: they are
in ``model.safetensors`` now), the adaptation method and its options (the LoRA / VPT layers must exist
before the weights are loaded), the task's head arguments, the class names and the preprocessing the
model expects.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from transformers import AutoTokenizer

from medfm.artifacts import Artifact
from medfm.encoders import create_encoder, default_text_model_path
from medfm.tasks.classification import ClassificationModel
from medfm.tasks.report_generation import ReportGenerator, ReportVocab, build_decoder, decoder_from_config
from medfm.tasks.segmentation import SegmentationModel

from .methods import adapt_encoder


def build_encoder(spec: dict, pretrained: bool = True) -> nn.Module:
    """The spec's encoder (random, or its ``pretrained`` weights when asked), adapted by its method."""
    kw = {k: v for k, v in spec["encoder"].items() if v is not None}
    if not pretrained:
        kw.pop("pretrained", None)
    encoder = create_encoder(kw.pop("name"), **kw)
    return adapt_encoder(encoder, spec["method"], lora=spec.get("lora"), vpt=spec.get("vpt"))


class TaskArtifact(Artifact):
    """Mixin: the task model's spec is its config; ``from_config`` rebuilds encoder + adaptation + head."""

    spec: dict

    def artifact_config(self) -> dict:
        return self.spec

    @classmethod
    def from_config(cls, config: dict, folder: Path | None = None):
        return cls.from_spec(config, pretrained=False)


class FinetunedClassifier(ClassificationModel, TaskArtifact):
    """A :class:`ClassificationModel` that saves and reloads as an artifact."""

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True) -> "FinetunedClassifier":
        h = spec["head"]
        model = cls(build_encoder(spec, pretrained), h["num_classes"], h["dropout"], standardize=h["head_norm"])
        model.spec = spec
        return model


class FinetunedSegmenter(SegmentationModel, TaskArtifact):
    """A :class:`SegmentationModel` that saves and reloads as an artifact."""

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True) -> "FinetunedSegmenter":
        h = spec["head"]
        model = cls(build_encoder(spec, pretrained), h["num_classes"], h["feature_size"])
        model.spec = spec
        return model


class FinetunedReporter(ReportGenerator, TaskArtifact):
    """A :class:`ReportGenerator` that saves and reloads as an artifact: ``config.json`` (the spec, with
    the decoder's BERT config and the compact vocabulary), ``model.safetensors`` (encoder, projector,
    decoder) and ``tokenizer/``."""

    components = ("tokenizer",)

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "FinetunedReporter":
        h = spec["head"]
        vocab = ReportVocab(h["vocab"], h["unk_id"]) if h.get("vocab") else None
        if pretrained:  # warm-started from the text model (new weights listed in a warning)
            decoder, _ = build_decoder(h["text_model"], h["decoder_config"].get("num_hidden_layers", 0), vocab)
            tokenizer = AutoTokenizer.from_pretrained(str(h["text_model"] or default_text_model_path()))
        else:  # rebuilt from the saved config; the weights come from model.safetensors
            decoder = decoder_from_config(h["decoder_config"])
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        model = cls(build_encoder(spec, pretrained), decoder, tokenizer, vocab, max_length=h["max_length"],
                    label_smoothing=h["label_smoothing"])
        model.spec = spec
        return model

    @classmethod
    def from_config(cls, config: dict, folder: Path | None = None):
        return cls.from_spec(config, pretrained=False, folder=folder)
