"""YAML pretraining recipes: read, override from the command line, build, run.

A recipe (see the top-level ``encoders/`` folder) has the sections ``method``,
``seed``, ``encoder``, ``mae`` / ``dino`` / ``clip`` / ... (the method's arguments), ``data``,
``view`` (the method's augmentation), ``optim``, ``trainer`` and ``probe``.
Keys a recipe leaves out take the defaults below; a key that is neither in
the defaults nor in a free-form section is an error, so typos do not pass
silently. ``run_pretrain`` writes into the run folder:

* ``recipe.yaml``: the resolved recipe;
* ``checkpoints/last.ckpt`` (and every ``checkpoint_every_n_steps``): full
  resume state: weights, optimizer, scheduler, step, RNG;
* ``logs/metrics.csv`` (+ TensorBoard events when tensorboard is installed);
  a resumed run keeps the earlier log as ``logs/metrics-partN.csv``;
* ``encoder/``: the encoder alone (``save_pretrained``), loadable with
  ``create_encoder(name, ..., pretrained=RUN/encoder)`` or ``medfm.encoders.from_pretrained``;
* ``mae_reconstruction.png`` for MAE; ``text/`` and ``clip_heads.safetensors`` for CLIP.

``method: text_mlm`` (text tower adaptation) has no image encoder: ``run_pretrain`` hands it to
:func:`medfm.pretrain.text_mlm.run_text_mlm`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import yaml
from torch.utils.data import Subset

from medfm.data import DataError, open_dataset
from medfm.data.transforms import PRESETS

from medfm.config import load_config, merge
from medfm.training import StepData, make_trainer, prepare_run_folder

from .callbacks import FinishRun, OnlineProbe
from .clip import CLIPModule
from .dino import DINOModule
from .mae import MAEModule
from .synth_contrastive import MAX_SHIFT, SynthContrastiveModule, SynthSegModule
from .text_mlm import TextMLMModule
from .views import StepSampler, ViewDataset

METHODS = {"mae": MAEModule, "dino": DINOModule, "synth_contrastive": SynthContrastiveModule,
           "synth_seg": SynthSegModule, "clip": CLIPModule, "text_mlm": TextMLMModule}

DEFAULTS: dict[str, Any] = {
    "method": "mae",
    "seed": 0,
    # encoder: name + spatial_dims + in_chans + img_size + pretrained; other keys go to the encoder (free-form)
    "encoder": {"name": "vit_small", "spatial_dims": 2, "in_chans": 1, "img_size": 224, "pretrained": None},
    "mae": {},  # free-form: MAEModule arguments
    "dino": {},  # free-form: DINOModule arguments
    "synth_contrastive": {},  # free-form: SynthContrastiveModule arguments
    "synth_seg": {},  # free-form: SynthSegModule arguments (n_labels comes from data.synthetic)
    "clip": {},  # free-form: CLIPModule arguments (text_model, embed_dim, loss, lock_image, ...)
    "text_mlm": {},  # free-form: text_model, max_length, mlm_probability, holdout_every (text tower adaptation)
    "data": {
        "regime": "real",  # real | synthetic (the randomized-synthesis engine) | mixed
        "mix": 0.5,  # mixed: fraction of samples drawn from the engine
        "synthetic": {},  # free-form: SynthConfig arguments (size defaults to encoder.img_size, n_labels, kind, ...)
        "path": None,  # npz, CSV/TSV/JSONL manifest or folder (or give --data)
        "split": "train",  # npz split / manifest split column value (null: every row)
        "text": None,  # manifest column with each image's report/caption (CLIP)
        "preset": "radiograph_2d",  # intensity/geometry preprocessing: radiograph_2d | ct_3d | mr_3d
        "preset_args": {},  # e.g. {spacing: 2.0} for the 3D presets
        "batch_size": 64,  # per device
        "num_workers": 2,
        "cache": True,  # keep preprocessed samples in memory (views are drawn fresh every step)
    },
    "view": {},  # free-form: the method's make_view arguments (crop scales, number of local crops, ...)
    "optim": {"lr": 1.5e-4, "weight_decay": 0.05, "betas": [0.9, 0.95], "warmup_steps": 0},
    "trainer": {
        "max_steps": 1000,
        "accelerator": "auto",
        "devices": 1,
        "strategy": "auto",
        "precision": "auto",  # bf16-mixed on CUDA, 32-true on CPU (bf16 is ~500x slower on CPUs)
        "gradient_clip_val": None,
        "log_every_n_steps": 10,
        "checkpoint_every_n_steps": 500,
        "enable_progress_bar": True,
        # any other lightning.Trainer argument may be added here
    },
    "probe": {
        "every_n_steps": 0,  # 0: off
        "path": None,  # labelled data (default: data.path)
        "label": None,  # manifest label column (npz: its labels)
        "train_split": "train",
        "val_split": "val",
        "max_train": 1000,
        "max_val": 500,
    },
}
FREE_FORM = {"encoder", "mae", "dino", "synth_contrastive", "synth_seg", "clip", "text_mlm", "view", "data.preset_args", "data.synthetic", "trainer"}


# --------------------------------------------------------------------- recipe
def load_recipe(path: str | os.PathLike | None = None, overrides: Sequence[str] | dict = ()) -> dict:
    """The recipe at ``path`` (or the defaults) with ``overrides`` applied, validated."""
    cfg = load_config(DEFAULTS, FREE_FORM, path, overrides)
    if cfg["method"] not in METHODS:
        raise ValueError(f"unknown method {cfg['method']!r}; available: {', '.join(METHODS)}")
    if cfg["data"]["regime"] not in ("real", "synthetic", "mixed"):
        raise ValueError(f"unknown data.regime {cfg['data']['regime']!r}: real, synthetic or mixed")
    if cfg["data"]["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {cfg['data']['preset']!r}; available: {', '.join(PRESETS)}")
    return cfg


# ----------------------------------------------------------------------- build
def build_encoder(cfg: dict) -> torch.nn.Module:
    from medfm.encoders import create_encoder

    # a key set to null takes the encoder's default (e.g. ``patch_size: null`` for a ResNet, which has none)
    kw = {k: v for k, v in cfg["encoder"].items() if v is not None}
    return create_encoder(kw.pop("name"), **kw)


def build_module(cfg: dict, encoder: torch.nn.Module) -> L.LightningModule:
    method = cfg["method"]
    optim = dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"])
    args = dict(cfg[method])
    if method == "synth_seg":
        args.setdefault("n_labels", cfg["data"]["synthetic"].get("n_labels", 8))
    return METHODS[method](encoder, **args, **optim)


def _preprocess(cfg: dict, size=None):
    d = cfg["data"]
    return PRESETS[d["preset"]](size=size, **d["preset_args"])


def build_view(cfg: dict):
    enc = cfg["encoder"]
    kw = dict(cfg["view"])
    if cfg["method"] == "dino":
        patch = enc.get("patch_size", 16)
        kw.setdefault("multiple", patch if isinstance(patch, int) else max(patch))
    return METHODS[cfg["method"]].make_view(enc["spatial_dims"], enc["img_size"], **kw)


class PretrainData(StepData):
    """Endless, step-addressed batches of random views (see :mod:`medfm.pretrain.views`)."""

    def __init__(self, dataset, view, batch_size: int, num_workers: int = 0, seed: int = 0, synthetic=None,
                 mix: float = 0.0):
        views = ViewDataset(dataset, view, seed=seed, synthetic=synthetic, mix=mix)
        super().__init__(views, len(views) if dataset is not None else None, batch_size, num_workers, seed)
        self.views = views

    def fixed_views(self, n: int) -> torch.Tensor:
        """The first ``n`` views of the run (positions 0..n-1), for figures."""
        sampler = iter(StepSampler(self.n, n, seed=self.seed))
        return torch.stack([self.views[next(sampler)]["image"] for _ in range(n)])


class _SynthSource:
    """Picklable ``position -> sample`` of the synthesis engine (seeded by the run's seed):
    the image alone, or for pair methods ``image``, ``image2`` and ``mask``."""

    def __init__(self, config, seed: int, pairs: bool = False, masks: bool = False, max_shift: int = 0):
        self.config, self.seed, self.pairs, self.masks, self.max_shift = config, seed, pairs, masks, max_shift

    def __call__(self, position: int):
        from medfm.synthetic import synth_sample

        if self.pairs:
            return self._pair(position)
        s = synth_sample(self.config, self.seed, position)
        return {"image": s["image"], "mask": s["mask"]} if self.masks else s["image"]

    def _pair(self, position: int) -> dict:
        """Two renderings of one map (made ``max_shift`` larger), cropped independently; ``shift`` maps
        view-1 voxels to view-2 voxels (v -> v + shift)."""
        import dataclasses

        import numpy as np

        from medfm.synthetic import synth_pair

        m = self.max_shift
        big = dataclasses.replace(self.config, size=tuple(s + m for s in self.config.shape))
        s = synth_pair(big, self.seed, position)
        rng = np.random.default_rng([self.seed, position, 3])
        o1, o2 = rng.integers(0, m + 1, (2, len(self.config.shape)))

        def crop(x, o):
            return x[(slice(None),) + tuple(slice(int(a), int(a) + n) for a, n in zip(o, self.config.shape))]

        return {"image": crop(s["image"], o1), "image2": crop(s["image2"], o2), "mask": crop(s["mask"], o1),
                "shift": torch.as_tensor(o1 - o2)}


def build_data(cfg: dict) -> PretrainData:
    """Real data (``data.path``), the synthesis engine, or a mix of both, as ``data.regime`` says."""
    d, enc = cfg["data"], cfg["encoder"]
    regime = d["regime"]
    pairs = getattr(METHODS[cfg["method"]], "needs_pairs", False)
    masks = getattr(METHODS[cfg["method"]], "needs_mask", False)
    if (pairs or masks) and regime != "synthetic":
        raise ValueError(f"method {cfg['method']} trains on the engine's samples: set data.regime=synthetic")
    if getattr(METHODS[cfg["method"]], "needs_text", False) and (regime != "real" or not d["text"]):
        raise ValueError(f"method {cfg['method']} trains on image-text pairs: set data.regime=real and data.text "
                         f"to the manifest column holding each image's report or caption (now regime={regime}, "
                         f"text={d['text']})")
    dataset = synthetic = None
    if regime in ("real", "mixed"):
        if not d["path"]:
            raise ValueError(f"data.regime={regime} needs data: give --data PATH (an npz, a manifest or a folder) "
                             "or set data.path; or use data.regime=synthetic")
        text = {"text_key": d["text"]} if d["text"] else {}
        dataset = open_dataset(d["path"], split=d["split"], spatial_dims=enc["spatial_dims"],
                               transform=_preprocess(cfg), cache=d["cache"], **text)
    if regime in ("synthetic", "mixed"):
        from medfm.synthetic import SynthConfig

        if enc.get("in_chans", 1) != 1:
            raise ValueError("the synthesis engine makes one-channel images; set encoder.in_chans=1")
        synth = dict(d["synthetic"])
        synth.setdefault("size", enc["img_size"])
        synthetic = _SynthSource(SynthConfig(spatial_dims=enc["spatial_dims"], **synth), cfg["seed"], pairs=pairs,
                                 masks=masks, max_shift=cfg[cfg["method"]].get("max_shift", MAX_SHIFT) if pairs else 0)
    mix = {"real": 0.0, "synthetic": 1.0, "mixed": d["mix"]}[regime]
    return PretrainData(dataset, build_view(cfg), d["batch_size"], d["num_workers"], seed=cfg["seed"],
                        synthetic=synthetic, mix=mix)


def _subset(ds, n: int, seed: int):
    if len(ds) <= n:
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(ds, idx.tolist())


def build_probe(cfg: dict) -> OnlineProbe | None:
    """The online probe, or None when it is off or the data has no labels / no validation split."""
    p = cfg["probe"]
    if not p["every_n_steps"]:
        return None
    if not (p["path"] or cfg["data"]["path"]):
        warnings.warn("online probe off: no labelled data (set probe.path to a labelled npz or manifest)", stacklevel=2)
        return None
    path = str(p["path"] or cfg["data"]["path"])
    enc = cfg["encoder"]
    is_npz = path.lower().endswith(".npz")
    if os.path.isdir(path) or not (is_npz or p["label"]):
        warnings.warn(f"online probe off: {path} has no labels (set probe.label to a manifest column, "
                      "or probe.path to a labelled npz/manifest)", stacklevel=2)
        return None
    kw = dict(spatial_dims=enc["spatial_dims"], label=p["label"], transform=_preprocess(cfg, size=enc["img_size"]),
              cache=True)
    try:
        train = open_dataset(path, split=p["train_split"], **kw)
        val = open_dataset(path, split=p["val_split"], **kw)
    except DataError as e:
        warnings.warn(f"online probe off: {e}", stacklevel=2)
        return None
    if is_npz and train.labels is None:
        warnings.warn(f"online probe off: {path} has no labels", stacklevel=2)
        return None
    return OnlineProbe(_subset(train, p["max_train"], cfg["seed"]), _subset(val, p["max_val"], cfg["seed"]),
                       p["every_n_steps"])


def build_trainer(cfg: dict, out: Path, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    finish = FinishRun(out, figure_samples=4 if cfg["method"] == "mae" else 0)
    return make_trainer(cfg["trainer"], out, [*callbacks, finish])


def run_pretrain(cfg: dict, out: str | os.PathLike, data_path: str | None = None, resume: bool = False,
                 callbacks: Sequence[L.Callback] = ()) -> Path:
    """Pretrain the recipe's encoder with its method; returns the run folder.

    ``resume=True`` continues from ``out/checkpoints/last.ckpt`` (model, optimizer,
    scheduler, step, RNG): the resumed run ends with the weights an uninterrupted
    run would have.
    """
    out = Path(out)
    if data_path:
        cfg = merge(cfg, {"data": {"path": str(data_path)}}, FREE_FORM)
    if cfg["method"] == "text_mlm":  # text only: no image encoder, views or probe
        from .text_mlm import run_text_mlm

        return run_text_mlm(cfg, out, resume=resume, callbacks=callbacks)
    ckpt = prepare_run_folder(out, resume)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    data = build_data(cfg)
    probe = build_probe(cfg)
    module = build_module(cfg, build_encoder(cfg))
    trainer = build_trainer(cfg, out, [*([probe] if probe else []), *callbacks])
    if trainer.is_global_zero:
        with open(out / "recipe.yaml", "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    return out
