"""The base of every pretraining method plug-in, and the pretraining recipe schema.

A method is one file: its recipe section (a ``Config`` dataclass: defaults and types, declared once),
its LightningModule, and a :class:`PretrainMethod` subclass registered with ``@register_method`` that
says what it needs (``needs``: ``views`` of real or synthetic images, synthetic ``pairs``, synthetic
images with ``masks``, image-``text`` pairs), which view it draws (``make_view``) and what it exports
(``export``; by default the encoder, with the preprocessing it was trained on, into ``RUN/encoder``).
Everything else (run folder, seeding, Trainer, resume, recipe.yaml) is :func:`medfm.run.run`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch.nn as nn

from medfm.atomic import write_json
from medfm.data import open_dataset
from medfm.encoders import build_encoder, create_model_and_transforms
from medfm.evaluate.probe import embed_dataset, logistic_probe
from medfm.run import ENCODER, TRAINER, Built, FreeForm, OptimConfig, RunFolder, RunPlugin

from .data import (
    PretrainDataConfig,
    ProbeConfig,
    SynthSource,
    build_data,
    build_probe,
    preprocess_record,
    synth_config,
)
from .registry import METHODS
from .views import mae_view


def pretrain_schema() -> dict:
    """Sections of a pretraining recipe: the common ones plus every registered method's own."""
    return {
        "method": "mae",
        "seed": 0,
        "encoder": ENCODER,  # name + spatial_dims + in_chans + img_size + pretrained; other keys go to the encoder
        **METHODS.sections(),
        "data": PretrainDataConfig,
        "view": FreeForm(),  # the method's make_view arguments (crop scales, number of local crops, ...)
        "optim": OptimConfig,
        "trainer": TRAINER,
        "probe": ProbeConfig,
    }


def optim_args(cfg: dict) -> dict:
    """TrainingModule arguments: the ``optim`` section and the step budget."""
    return dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"])


class PretrainMethod(RunPlugin):
    """Base plug-in of a pretraining method (see the module docstring)."""

    module_class: ClassVar[type]  # the LightningModule: module_class(encoder, **section, **optim)
    needs: ClassVar[str] = "views"
    # whether the batched engine can make this method's synthetic inputs on the training device
    # (data.synth_device): MAE's random-resized crop (the default view, ``view`` section) or label maps
    device_synthesis: ClassVar[bool] = True
    model_folder = "encoder"
    evaluate_options: ClassVar[tuple[str, ...]] = ("data", "split", "label", "out")  # a linear probe of the encoder

    def make_view(self, cfg: dict):
        """The random view of one sample (default: MAE's random-resized crop; ``view`` section = its arguments)."""
        enc = cfg["encoder"]
        return mae_view(enc["spatial_dims"], enc["img_size"], **cfg["view"])

    def synthetic_source(self, cfg: dict) -> SynthSource:
        """``position -> sample`` of the synthesis engine for the synthetic and mixed regimes (images, or
        images with their label maps when the method ``needs`` masks)."""
        return SynthSource(synth_config(cfg), cfg["seed"], masks=self.needs == "masks")

    def module_args(self, cfg: dict) -> dict:
        """The module's method arguments: this method's recipe section."""
        return dataclasses.asdict(self.config(cfg)) if self.Config is not None else {}

    def build_module(self, cfg: dict, encoder: nn.Module):
        return self.module_class(encoder, **self.module_args(cfg), **optim_args(cfg))

    def build(self, cfg: dict, folder: RunFolder) -> Built:
        data = build_data(cfg, self)
        probe = build_probe(cfg)
        module = self.build_module(cfg, build_encoder(cfg["encoder"]))
        return Built(module, data, [probe] if probe else [], cfg=cfg)

    def before_fit(self, built: Built, folder: RunFolder, resumed: bool) -> None:
        """A mixture's record (its sources, weights, sizes and what de-duplication dropped) into the run."""
        mixture = getattr(built.data, "mixture", None)
        if mixture is not None:
            write_json(folder / "mixture.json", mixture)

    def export(self, module, folder: RunFolder, trainer, built: Built) -> None:
        """The encoder alone (``save_pretrained``, with its preprocessing) into ``RUN/encoder``."""
        encoder = module.encoder
        encoder.preprocess = preprocess_record(built.cfg)
        folder.save(encoder, "encoder")

    def evaluate(self, run: Path, data: str | None = None, split: str = "val", label: str | None = None,
                 out: str | None = None) -> dict:
        """A linear probe of the run's encoder on labelled data (trained on ``train``, scored on ``split``),
        with the preprocessing the encoder recorded."""
        if not data:
            raise ValueError("evaluating a pretrained encoder needs labelled data: give --data (an npz or a "
                             "manifest with --label COLUMN)")
        encoder, transform = create_model_and_transforms(run / "encoder")
        kw = dict(spatial_dims=encoder.spatial_dims, transform=transform, label=label)
        train, held = open_dataset(data, split="train", **kw), open_dataset(data, split=split, **kw)
        xt, yt = embed_dataset(encoder, train, progress="embedding train")
        xv, yv = embed_dataset(encoder, held, progress=f"embedding {split}")
        metrics = {k: v for k, v in logistic_probe(xt, yt, xv, yv).items() if k != "val_scores"}
        metrics = {"run": str(run), "data": str(data), "split": split, "linear_probe": metrics}
        dest = Path(out) if out else run / f"eval_{split}"
        dest.mkdir(parents=True, exist_ok=True)
        write_json(dest / "metrics.json", metrics)
        return metrics
