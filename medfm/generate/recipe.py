"""Generator recipes (``generators/diffusion_2d.yaml``, ``generators/diffusion_3d.yaml``): schema, data, run.

A generator is one more plug-in of the run layer (:class:`DiffusionPlugin`, kind ``generate``): its
section ``diffusion`` (:class:`medfm.generate.spec.DiffusionConfig`: network, noise schedule, conditioning, classifier-free
guidance, EMA, sampler; defaults declared once), its ``data`` (:class:`GeneratorDataConfig`: which
column holds the class, prompt or label map), ``optim`` and ``trainer``. :func:`medfm.run.run` does the
rest (run folder, seeding, resume with the EMA weights, recipe.yaml, run.json). RUN then holds

* ``model/``: the generator (EMA weights) as an artifact folder: ``medfm.load(RUN)``;
* ``samples.png``: a grid of samples from the exported weights, one per condition drawn from the
  training data;
* ``checkpoints/last.ckpt`` (with the EMA state), ``logs/``, ``recipe.yaml``, ``run.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import numpy as np
import torch

from medfm.data import DataError, load_mask, open_dataset
from medfm.data.cache import dataset_cache
from medfm.data.preprocess import Preprocess
from medfm.data.transforms import PRESETS
from medfm.run import TRAINER, DataConfig, OptimConfig, RecipeKind, recipe_kind
from medfm.run.recipe import with_defaults

from .spec import CONDITIONING, DiffusionSpec
from .pipeline import SAMPLERS
from .registry import GENERATORS


@dataclass
class GeneratorDataConfig(DataConfig):
    """``data`` of a generator recipe: the shared keys (:class:`medfm.run.DataConfig`; the preset's output is
    resized / cropped to ``diffusion.image_size``) and these."""

    split: str | None = "train"  # npz split / manifest split value (null: every row)
    label: str | None = None  # class: manifest label column (an npz carries its labels)
    text: str | None = None  # text: manifest column with the prompt (caption, report)
    mask: str | None = None  # mask: manifest column with the label-map file
    augment: bool = False  # the preset's training augmentation / random crops (3D: random crops of larger volumes)


def generator_schema() -> dict:
    """Sections of a generator recipe."""
    return {
        "method": "diffusion",
        "seed": 0,
        **GENERATORS.sections(),
        "data": GeneratorDataConfig,
        "optim": with_defaults(OptimConfig, lr=5e-4, weight_decay=0.0, betas=[0.9, 0.999], warmup_steps=100),
        "trainer": TRAINER,
    }


def check_generator_recipe(cfg: dict) -> None:
    """The diffusion section's choices, the preset, and the data column the conditioning reads."""
    s = cfg["diffusion"]
    for key, allowed in (("conditioning", CONDITIONING), ("sampler", tuple(SAMPLERS)),
                         ("prediction_type", ("epsilon", "v_prediction"))):
        if s[key] not in allowed:
            raise ValueError(f"diffusion.{key} must be one of {', '.join(allowed)}, got {s[key]!r}")
    if s["spatial_dims"] not in (2, 3):
        raise ValueError(f"diffusion.spatial_dims must be 2 or 3, got {s['spatial_dims']}")
    if cfg["data"]["preset"] not in PRESETS:
        raise ValueError(f"unknown data.preset {cfg['data']['preset']!r}; available: {', '.join(PRESETS)}")
    column = {"text": "text", "mask": "mask"}.get(s["conditioning"])
    if column and not cfg["data"][column]:
        raise ValueError(f"{s['conditioning']} conditioning needs data.{column}: the manifest column holding each "
                         f"image's {'prompt' if column == 'text' else 'label-map file'}")


GENERATE = RecipeKind(GENERATORS, "method", generator_schema, check_generator_recipe, folder="generators")
load_generator_recipe = GENERATE.load  # the recipe at a path (or the defaults), profile and overrides applied, checked
run_generator = GENERATE.run  # train the recipe's generator; returns the run folder (model/, samples.png)


def is_generator_recipe(path: str | os.PathLike) -> bool:
    """Whether a recipe file names a generator method (``method: diffusion``), read from the recipe itself."""
    return recipe_kind(path, among=("generate", "pretrain")) is GENERATE


# ----------------------------------------------------------------- data
def open_training_set(cfg: dict, path: str | None = None):
    """The recipe's training images with what its conditioning needs (labels, prompts, label maps),
    preprocessed to ``diffusion.image_size``."""
    d, s = cfg["data"], cfg["diffusion"]
    path = str(path or d["path"] or "")
    if not path:
        raise ValueError("a generator needs data: give --data PATH (an npz, a manifest or a folder) or set data.path")
    transform = PRESETS[d["preset"]](size=s["image_size"], train=d["augment"], **d["preset_args"])
    kwargs = {}
    if path.lower().endswith((".csv", ".tsv", ".jsonl")):
        kwargs = dict(label=d["label"] if s["conditioning"] == "class" else None,
                      text_key=d["text"] if s["conditioning"] == "text" else None,
                      mask_key=d["mask"] if s["conditioning"] == "mask" else None)
        if s["conditioning"] == "class" and s["class_names"]:
            kwargs["classes"] = s["class_names"]
    elif s["conditioning"] in ("text", "mask"):
        raise DataError(f"{path}: {s['conditioning']} conditioning reads a manifest (CSV/JSONL) with a "
                        f"'{d[s['conditioning']]}' column")
    return open_dataset(path, split=d["split"], spatial_dims=s["spatial_dims"], transform=transform,
                        cache=dataset_cache(d["cache"], d["cache_dir"], {
                            **Preprocess(d["preset"], s["image_size"], d["preset_args"]).record(),
                            "augment": d["augment"], "dims": s["spatial_dims"]}),
                        on_error=d["on_error"], preflight=d["preflight"], **kwargs)


def complete_spec(cfg: dict, train) -> DiffusionSpec:
    """The ``diffusion`` section completed from the training data (classes, mask labels) and the
    preprocessing, as the generator's spec."""
    s, d = dict(cfg["diffusion"]), cfg["data"]
    if len(train) == 0:
        raise DataError(f"{d['path']}: the training split {d['split']!r} is empty")
    if s["conditioning"] == "class":
        names = getattr(train, "classes", None)
        if names is None:  # an npz: integer labels
            targets = getattr(train, "targets", None)
            if targets is None or np.ndim(targets) != 1:
                raise DataError(f"{d['path']}: class conditioning needs one integer label per image "
                                "(set data.label to the manifest's label column)")
            names = [str(i) for i in range(int(np.max(targets)) + 1)]
        s["class_names"] = [str(c) for c in (s["class_names"] or names)]
        s["num_classes"] = s["num_classes"] or len(s["class_names"])
        if len(s["class_names"]) != s["num_classes"]:
            raise ValueError(f"diffusion.class_names has {len(s['class_names'])} names for {s['num_classes']} classes")
    if s["conditioning"] == "mask" and not s["mask_classes"]:
        # the largest label value in the label-map files themselves (a random crop could miss one)
        top = 0
        for rec in getattr(train, "records", []):
            if rec.mask is None:
                raise DataError(f"{d['path']} line {rec.line}: no label map in column {d['mask']!r}")
            top = max(top, int(torch.as_tensor(load_mask(rec.mask)["image"]).max()))
        s["mask_classes"] = top + 1
    return DiffusionSpec(**s, preprocess=Preprocess(d["preset"], s["image_size"], d["preset_args"]).record())


def batch_condition(batch: dict, conditioning: str, mask_classes: int | None = None) -> dict:
    """The generator's condition for a training batch."""
    if conditioning == "class":
        return {"class_labels": torch.as_tensor(batch["label"]).long()}
    if conditioning == "text":
        return {"prompts": [str(t) for t in batch["text"]]}
    if conditioning == "mask":
        mask = batch["mask"].round().long()
        if int(mask.min()) < 0 or int(mask.max()) >= mask_classes:
            raise DataError(f"a training label map holds values {int(mask.min())}..{int(mask.max())}, outside "
                            f"0..{mask_classes - 1} (diffusion.mask_classes)")
        return {"mask": mask}
    return {}
