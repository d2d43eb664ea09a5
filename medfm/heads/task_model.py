"""The artifact every fine-tuned task model is (:class:`TaskModel`: adapted encoder + head, saved with its spec)
and the one way its encoder is built from that spec (:func:`build_task_encoder`)."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from medfm.artifacts import Artifact
from medfm.encoders import build_encoder
from medfm.tuning import adapt_encoder


def build_task_encoder(spec: dict, pretrained: bool = True) -> nn.Module:
    """The spec's encoder (random, or its ``pretrained`` weights when asked: :func:`medfm.encoders.build_encoder`),
    prepared by its tuning method with that method's section of the spec."""
    encoder = build_encoder(spec["encoder"], pretrained=pretrained)
    method = spec["method"]
    return adapt_encoder(encoder, method, **{method: spec.get(method)})


class TaskModel(Artifact):
    """A fine-tuned task model (adapted encoder + head) as an artifact that rebuilds itself with no recipe.

    Its ``config.json`` is its *spec*: the encoder's recipe section, the tuning method and its section
    (the LoRA / VPT layers must exist before the weights load), the head's arguments (``head``), the class
    names and the preprocessing the model expects. A task model class implements ``from_spec(spec,
    pretrained, folder)``: the model, with the encoder's pretrained weights when ``pretrained`` (a new run)
    and fresh ones otherwise (a reload: the weights come from ``model.safetensors``)."""

    spec: dict

    def artifact_config(self) -> dict:
        return self.spec

    @classmethod
    def from_config(cls, config: dict, folder: Path | None = None):
        return cls.from_spec(config, pretrained=False, folder=folder)

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None):  # pragma: no cover
        raise NotImplementedError
