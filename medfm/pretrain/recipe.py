"""Pretraining recipes (top-level ``encoders/``): read them, run them.

A recipe has the sections ``method``, ``seed``, ``encoder``, one section per registered method (``mae``,
``dino``, ``clip``, ...: each method's own ``Config``), ``data``, ``view``, ``optim``, ``trainer`` and
``probe`` (:func:`medfm.pretrain.method.pretrain_schema`). ``run_pretrain`` hands the recipe to the
method's plug-in and :func:`medfm.run.run`; the run folder then holds ``recipe.yaml``, ``run.json``,
``checkpoints/last.ckpt``, ``logs/`` and what the method exports (``encoder/`` for every image method,
with the preprocessing it was trained on; ``model/``, ``text/`` for CLIP; ``mae_reconstruction.png``
for MAE; ``mlm/`` and ``metrics.json`` for text MLM).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L

from medfm.data.transforms import preset_mismatch
from medfm.run import load_config, run
from medfm.run.recipe import adopt_saved_architecture, merge

from .data import PretrainDataConfig, validate_data
from .method import pretrain_schema
from .registry import METHODS


def load_recipe(path: str | os.PathLike | None = None, overrides: Sequence[str] | dict = (),
                profile: str | None = None) -> dict:
    """The recipe at ``path`` (or the defaults) with ``overrides`` applied, validated."""
    cfg = load_config(pretrain_schema(), path, overrides, profile)
    adopt_saved_architecture(cfg)
    METHODS.get_plugin(cfg["method"])  # an unknown method is an error naming the known ones
    validate_data(PretrainDataConfig(**cfg["data"]))
    dims = cfg["encoder"]["spatial_dims"]
    mismatch = preset_mismatch(cfg["data"]["preset"], dims)  # the exported encoder records it as its preprocessing
    if mismatch:
        raise ValueError(f"the encoder is {dims}D but data.{mismatch}")
    return cfg


def run_pretrain(cfg: dict, out: str | os.PathLike, data_path: str | None = None, resume: bool = False,
                 callbacks: Sequence[L.Callback] = (), **run_options: Any) -> Path:
    """Pretrain as the recipe says; returns the run folder. ``resume=True`` continues from
    ``out/checkpoints/last.ckpt`` and ends with the weights an uninterrupted run would have."""
    if data_path:
        cfg = merge(cfg, {"data": {"path": str(data_path)}})
    return run(METHODS.get_plugin(cfg["method"]), cfg, out, resume=resume, callbacks=callbacks, **run_options)
