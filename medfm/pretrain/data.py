"""Pretraining data: real scans, the randomized-synthesis engine, or a mix, as step-keyed random views.

The recipe's ``data`` section (:class:`PretrainDataConfig`) picks the regime; the method says what it
needs (``needs``: image views, synthetic pairs, synthetic images with label maps, or image-text pairs)
and which view it draws (``make_view``). The online probe (``probe`` section) is built here too.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Subset

from medfm.data import DataError, JoinedDataset, open_dataset
from medfm.data.preprocess import Preprocess
from medfm.data.cache import dataset_cache
from medfm.data.transforms import PRESETS, with_channels
from medfm.evaluate.online_probe import OnlineProbe
from medfm.run import DataConfig, KeyedDataset, StepData, position_seed, section
from medfm.synthetic import SynthConfig, synth_pair, synth_sample
from medfm.synthetic.batched import synth_batch

from .mixture import build_mixture
from .views import batch_resized_crop

REGIMES = ("real", "synthetic", "mixed")
SYNTH_DEVICES = ("auto", "cpu", "device")


@dataclass
class PretrainDataConfig(DataConfig):
    """``data`` of a pretraining recipe: the shared keys (:class:`medfm.run.DataConfig`) and these."""

    regime: str = "real"  # real | synthetic (the randomized-synthesis engine) | mixed
    mix: float = 0.5  # mixed: fraction of samples drawn from the engine
    synthetic: dict = field(default_factory=dict)  # SynthConfig arguments (size defaults to encoder.img_size)
    # where the engine renders (synthetic regime): cpu (per sample, in the DataLoader workers) | device (whole
    # batches on the training device, medfm.synthetic.batched) | auto (device when training on a GPU)
    synth_device: str = "auto"
    split: str | None = "train"  # npz split / manifest split column value (null: every row)
    train_from: list[str] = field(default_factory=list)  # more image sets, whole (e.g. `medfm generate` manifests)
    text: str | None = None  # manifest column with each image's report/caption (CLIP, text MLM)
    batch_size: int = 64  # per device
    # a mixture (medfm.pretrain.mixture), instead of path / train_from: a list of {path, weight, split, preset,
    # preset_args, text, name}, each source drawn at its weight with its own preprocessing
    sources: list | None = None
    exclude: list = field(default_factory=list)  # evaluation splits ({path, split}) a mixture never trains on
    exclude_suite: str | None = None  # ... and every evaluation split of this suite file (`default`: medfm's)
    root: str | None = None  # where the mixture's and the suite's relative paths live (default: $MEDFM_SUITE_DATA)


@dataclass
class ProbeConfig:
    """``probe``: the online linear probe on frozen features during pretraining."""

    every_n_steps: int = 0  # 0: off
    path: str | None = None  # labelled data (default: data.path)
    label: str | list | None = None  # manifest label column (npz: its labels)
    train_split: str = "train"
    val_split: str = "val"
    max_train: int = 1000
    max_val: int = 500


def validate_data(d: PretrainDataConfig) -> None:
    if d.regime not in REGIMES:
        raise ValueError(f"unknown data.regime {d.regime!r}: real, synthetic or mixed")
    if d.synth_device not in SYNTH_DEVICES:
        raise ValueError(f"unknown data.synth_device {d.synth_device!r}: {', '.join(SYNTH_DEVICES)}")
    if d.preset not in PRESETS:
        raise ValueError(f"unknown preset {d.preset!r}; available: {', '.join(PRESETS)}")


def preprocess(cfg: dict, size=None):
    """The recipe's deterministic preprocessing (``data.preset`` + ``preset_args``) at ``size``."""
    d = section(cfg, "data", PretrainDataConfig)
    return PRESETS[d.preset](size=size, **d.preset_args)


def preprocess_record(cfg: dict) -> dict:
    """What an exported encoder records about its inputs (see :func:`medfm.encoders.preprocess_transform`)."""
    d = section(cfg, "data", PretrainDataConfig)
    return Preprocess(d.preset, cfg["encoder"]["img_size"], d.preset_args).record()


class SynthSource:
    """Picklable ``position -> sample`` of the synthesis engine (seeded by the run's seed):
    the image alone, or for pair methods ``image``, ``image2`` and ``mask``."""

    def __init__(self, config: SynthConfig, seed: int, pairs: bool = False, masks: bool = False, max_shift: int = 0):
        self.config, self.seed, self.pairs, self.masks, self.max_shift = config, seed, pairs, masks, max_shift

    def __call__(self, position: int):
        if self.pairs:
            return self._pair(position)
        s = synth_sample(self.config, self.seed, position)
        return {"image": s["image"], "mask": s["mask"]} if self.masks else s["image"]

    def _pair(self, position: int) -> dict:
        """Two renderings of one map (made ``max_shift`` larger), cropped independently; ``shift`` maps
        view-1 voxels to view-2 voxels (v -> v + shift)."""
        m = self.max_shift
        big = dataclasses.replace(self.config, size=tuple(s + m for s in self.config.shape))
        s = synth_pair(big, self.seed, position)
        rng = np.random.default_rng([self.seed, position, 3])
        o1, o2 = rng.integers(0, m + 1, (2, len(self.config.shape)))

        def crop(x, o):
            return x[(slice(None),) + tuple(slice(int(a), int(a) + n) for a, n in zip(o, self.config.shape))]

        return {"image": crop(s["image"], o1), "image2": crop(s["image2"], o2), "mask": crop(s["mask"], o1),
                "shift": torch.as_tensor(o1 - o2)}


def synth_config(cfg: dict) -> SynthConfig:
    """The engine's configuration: ``data.synthetic`` at the encoder's size and dimension."""
    enc = cfg["encoder"]
    synth = dict(section(cfg, "data", PretrainDataConfig).synthetic)
    synth.setdefault("size", enc["img_size"])
    return SynthConfig(spatial_dims=enc["spatial_dims"], **synth)


def build_data(cfg: dict, method) -> StepData:
    """Real data (``data.path``), the synthesis engine (``method.synthetic_source``), or a mix of both, as
    ``data.regime`` says, in the form ``method.needs`` and with ``method.make_view``."""
    d, enc = section(cfg, "data", PretrainDataConfig), cfg["encoder"]
    validate_data(d)
    needs, name = method.needs, method.name
    if needs in ("pairs", "masks") and d.regime != "synthetic":
        raise ValueError(f"method {name} trains on the engine's samples: set data.regime=synthetic")
    if needs == "text" and (d.regime != "real" or not (d.text or d.sources)):
        raise ValueError(f"method {name} trains on image-text pairs: set data.regime=real and data.text "
                         f"to the manifest column holding each image's report or caption (now regime={d.regime}, "
                         f"text={d.text})")
    dataset = synthetic = mixture = None
    if d.sources is not None and (d.path or d.train_from):
        raise ValueError("data.sources (a mixture) replaces data.path and data.train_from: give one or the other "
                         "(--data sets data.path)")
    if d.regime in ("real", "mixed") and d.sources is not None:
        def cache_for(record):
            return dataset_cache(d.cache, d.cache_dir, record)

        dataset, mixture = build_mixture(d.sources, d, enc, cfg["seed"], needs == "text", cache_for)
    elif d.regime in ("real", "mixed"):
        if not d.path and not d.train_from:
            raise ValueError(f"data.regime={d.regime} needs data: give --data PATH (an npz, a manifest or a folder) "
                             "or set data.path; or use data.regime=synthetic")
        cache = dataset_cache(d.cache, d.cache_dir, {**Preprocess(d.preset, None, d.preset_args).record(),
                                                     "dims": enc["spatial_dims"], "chans": enc.get("in_chans", 1)})
        # images made the encoder's channel count first (colour -> grey), as fine-tuning makes them
        transform = with_channels(preprocess(cfg), enc.get("in_chans", 1))
        kw = dict(spatial_dims=enc["spatial_dims"], transform=transform, cache=cache, on_error=d.on_error,
                  preflight=d.preflight, **({"text_key": d.text} if d.text else {}))
        parts = [open_dataset(d.path, split=d.split, **kw)] if d.path else []
        parts += [open_dataset(p, split=None, **kw) for p in d.train_from]  # generated sets: every row
        dataset = parts[0] if len(parts) == 1 else JoinedDataset(parts)
    if d.regime in ("synthetic", "mixed"):
        if enc.get("in_chans", 1) != 1:
            raise ValueError("the synthesis engine makes one-channel images; set encoder.in_chans=1")
        if d.regime == "synthetic" and engine_on_device(cfg, d, method):
            return DeviceSynthData(synth_config(cfg), cfg["seed"], d.batch_size, masks=needs == "masks",
                                   view=None if needs == "masks" else dict(cfg["view"], size=enc["img_size"]))
        synthetic = method.synthetic_source(cfg)
    mix = {"real": 0.0, "synthetic": 1.0, "mixed": d.mix}[d.regime]
    keyed = KeyedDataset(dataset, method.make_view(cfg), seed=cfg["seed"], synthetic=synthetic, mix=mix)
    # a mixture is addressed by sample position (it picks the source itself): an endless source
    n = len(keyed) if dataset is not None and mixture is None else None
    data = StepData(keyed, n, d.batch_size, d.num_workers, cfg["seed"])
    data.mixture = mixture  # recorded in the run (mixture.json) by the method's before_fit
    return data


def engine_on_device(cfg: dict, d: PretrainDataConfig, method) -> bool:
    """Whether the synthetic regime renders on the training device (``data.synth_device``): ``device`` always,
    ``auto`` when the run trains on a GPU; only for methods whose inputs the batched path makes (MAE-style
    random-resized crops, or images with label maps). DINO's multi-crop and synthetic pairs stay on the CPU engine."""
    supported = method.needs in ("views", "masks") and method.device_synthesis
    if d.synth_device == "cpu":
        return False
    if d.synth_device == "device":
        if not supported:
            raise ValueError(f"data.synth_device=device: method {method.name}'s synthetic inputs ({method.needs}, "
                             f"{type(method.make_view(cfg)).__name__} views) are made by the CPU engine only; "
                             "set data.synth_device=cpu")
        return True
    accelerator = cfg["trainer"].get("accelerator", "auto")
    return supported and accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


class _Positions(torch.utils.data.Dataset):
    """``(index, position) -> {"position": position}``: what the loader carries when the device renders."""

    def __getitem__(self, key):
        return {"position": key[1]}


class DeviceSynthData(StepData):
    """The synthetic regime with the engine on the training device (:mod:`medfm.synthetic.batched`): the
    loader yields the step's sample positions only; once the batch is on the device its images (and label
    maps, ``masks``) are rendered there, then cropped as the method's view says (``view``: the MAE view's
    ``scale``/``flip`` and the output ``size``; None: the engine's size as it is). Positions are the
    step-keyed ones every run uses, so resume and multi-rank runs draw as on the CPU engine."""

    def __init__(self, config: SynthConfig, seed: int, batch_size: int, masks: bool = False, view: dict | None = None):
        super().__init__(_Positions(), None, batch_size, 0, seed)
        self.config, self.masks, self.view = config, masks, view

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return {"positions": batch["position"].tolist()}  # still on the host: no device read

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.render(batch["positions"], self.trainer.strategy.root_device)

    def render(self, positions: list[int], device) -> dict:
        out = synth_batch(self.config, self.seed, positions, device)
        if not self.masks:
            out.pop("mask")
        if self.view is not None:
            rngs = [np.random.default_rng(position_seed(self.seed, p)) for p in positions]
            v = self.view
            out["image"] = batch_resized_crop(out["image"], rngs, v["size"], tuple(v.get("scale", (0.5, 1.0))),
                                              v.get("flip", False))
        return out

    def fixed_samples(self, n: int, key: str = "image") -> torch.Tensor:
        keys = iter(self.sampler(batch_size=n))
        return self.render([next(keys)[1] for _ in range(n)], "cpu")[key]


def _subset(ds, n: int, seed: int):
    if len(ds) <= n:
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(ds, idx.tolist())


def build_probe(cfg: dict) -> OnlineProbe | None:
    """The online probe, or None when it is off or the data has no labels / no validation split."""
    p = section(cfg, "probe", ProbeConfig)
    if not p.every_n_steps:
        return None
    path = p.path or section(cfg, "data", PretrainDataConfig).path
    if not path:
        warnings.warn("online probe off: no labelled data (set probe.path to a labelled npz or manifest)", stacklevel=2)
        return None
    path = str(path)
    is_npz = path.lower().endswith(".npz")
    if os.path.isdir(path) or not (is_npz or p.label):
        warnings.warn(f"online probe off: {path} has no labels (set probe.label to a manifest column, "
                      "or probe.path to a labelled npz/manifest)", stacklevel=2)
        return None
    enc = cfg["encoder"]
    kw = dict(spatial_dims=enc["spatial_dims"], label=p.label, transform=preprocess(cfg, size=enc["img_size"]),
              cache=True)
    try:
        train = open_dataset(path, split=p.train_split, **kw)
        val = open_dataset(path, split=p.val_split, **kw)
    except DataError as e:
        warnings.warn(f"online probe off: {e}", stacklevel=2)
        return None
    if is_npz and train.labels is None:
        warnings.warn(f"online probe off: {path} has no labels", stacklevel=2)
        return None
    return OnlineProbe(_subset(train, p.max_train, cfg["seed"]), _subset(val, p.max_val, cfg["seed"]),
                       p.every_n_steps)
