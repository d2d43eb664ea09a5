"""Pretraining recipes (top-level ``encoders/``): read them, run them.

A recipe has the sections ``method``, ``seed``, ``encoder``, one section per registered method (``mae``,
``dino``, ``clip``, ...: each method's own ``Config``), ``data``, ``view``, ``optim``, ``trainer`` and
``probe`` (:func:`medfm.pretrain.method.pretrain_schema`). ``load_recipe`` and ``run_pretrain`` are the
run layer's one recipe path (:class:`medfm.run.RecipeKind`), which hands the recipe to the method's plug-in
and :func:`medfm.run.run`; the run folder then holds ``recipe.yaml``, ``run.json``,
``checkpoints/last.ckpt``, ``logs/`` and what the method exports (``encoder/`` for every image method,
with the preprocessing it was trained on; ``model/``, ``text/`` for CLIP; ``mae_reconstruction.png``
for MAE; ``mlm/`` and ``metrics.json`` for text MLM).
"""

from __future__ import annotations

from medfm.data.transforms import preset_mismatch
from medfm.run import RecipeKind

from .data import PretrainDataConfig, validate_data
from .method import pretrain_schema
from .registry import METHODS


def check_pretrain_recipe(cfg: dict) -> None:
    """The data section's values, and a preset that fits the encoder's dimensions (the exported encoder records
    it as its preprocessing)."""
    validate_data(PretrainDataConfig(**cfg["data"]))
    dims = cfg["encoder"]["spatial_dims"]
    mismatch = preset_mismatch(cfg["data"]["preset"], dims)
    if mismatch:
        raise ValueError(f"the encoder is {dims}D but data.{mismatch}")


PRETRAIN = RecipeKind(METHODS, "method", pretrain_schema, check_pretrain_recipe, folder="encoders")
load_recipe = PRETRAIN.load  # the recipe at a path (or the defaults), profile and overrides applied, checked
run_pretrain = PRETRAIN.run  # pretrain as the recipe says (resume=True continues from out/checkpoints/last.ckpt)
