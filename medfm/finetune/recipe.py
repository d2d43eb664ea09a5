"""YAML fine-tuning recipes (top-level ``tasks/``): build, train, evaluate, export.

A task recipe names the ``task`` (classification | segmentation), the
``encoder`` (random init, or ``encoder.pretrained``: a ``save_pretrained``
folder, a pretraining run, a weight file or ``timm:<name>``), the adaptation
``method`` (see :mod:`medfm.finetune.methods`) and its options, the data and
its splits, the optimizer and the trainer. ``run_finetune`` writes into RUN:

* ``recipe.yaml`` (resolved), ``checkpoints/last.ckpt`` (full resume state), ``logs/metrics.csv``;
* ``model.safetensors``: the whole task model (adapted encoder + head/decoder), reloaded by
  :func:`load_run` from ``recipe.yaml`` (nothing is unpickled);
* ``encoder/``: the encoder alone as ``save_pretrained``, adaptation merged (LoRA, SSF) so that it is a
  plain encoder again; for LoRA also ``adapter/`` (peft's adapter folder alone);
* ``metrics.json``: trainable / total parameters, wall time, and metrics on the validation split and, when
  the data has one, the test split (decision thresholds chosen on validation);
* figures: ``roc_<split>.png`` and ``confusion_<split>.png`` (classification), ``overlay_<split>.png`` and
  ``predictions_<split>/*.nii.gz`` (segmentation, 3D; the affine of the preprocessed input).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
import yaml
from torch.utils.data import Dataset, Subset

from medfm.atomic import atomic_path, write_json
from medfm.config import load_config, merge
from medfm.data import DataError, open_dataset
from medfm.data.transforms import PRESETS
from medfm.training import StepData, make_trainer, prepare_run_folder

from .methods import METHODS, adapt_encoder, count_parameters, export_encoder, is_lora

TASKS = ("classification", "segmentation")

DEFAULTS: dict = {
    "task": "classification",  # classification | segmentation
    "method": "linear_probe",  # linear_probe | full | lora | vpt | ssf | bitfit
    "seed": 0,
    "shots": None,  # few-shot: K labelled training examples per class (null: all)
    # encoder: name + spatial_dims + in_chans + img_size + pretrained; other keys go to the encoder (free-form)
    "encoder": {"name": "vit_small", "spatial_dims": 2, "in_chans": 1, "img_size": 224, "pretrained": None},
    "full": {"layer_decay": 0.75},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None},
    "vpt": {"num_tokens": 10, "deep": False},
    "classification": {
        "label": None,  # manifest label column(s) (npz: its labels)
        "classes": None,  # class names in index order (default: the sorted values of the column)
        "multi_label": False,
        "num_classes": None,  # null: from the training labels
        "class_weights": "auto",  # auto (inverse frequency) | none
        "dropout": 0.0,
        "head_norm": True,  # standardise features (BatchNorm, no affine) before the linear head
    },
    "segmentation": {
        "num_classes": 2,  # including background (label 0)
        "class_names": None,
        "mask": "mask",  # manifest column of the label maps
        "feature_size": 16,  # decoder width at full resolution (doubles per level)
        "overlap": 0.25,  # sliding-window overlap at evaluation
        "sw_batch_size": 4,
        "hd95": True,
    },
    "data": {
        "path": None,  # npz or CSV/TSV/JSONL manifest (or give --data)
        "train_split": "train",
        "val_split": "val",
        "test_split": "test",  # evaluated at the end when the data has it
        "preset": "radiograph_2d",
        "preset_args": {},
        "augment": True,  # the preset's training augmentation / random crops
        "batch_size": 32,
        "num_workers": 2,
        "cache": True,
    },
    "optim": {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_steps": 0},
    "trainer": {
        "max_steps": 500,
        "accelerator": "auto",
        "devices": 1,
        "strategy": "auto",
        "precision": "auto",
        "gradient_clip_val": None,
        "log_every_n_steps": 10,
        "checkpoint_every_n_steps": 200,
        "enable_progress_bar": True,
    },
}
FREE_FORM = {"encoder", "data.preset_args", "trainer"}


def load_task_recipe(path: str | os.PathLike | None = None, overrides: Sequence[str] | dict = ()) -> dict:
    """The task recipe at ``path`` (or the defaults) with ``overrides`` applied, validated."""
    cfg = load_config(DEFAULTS, FREE_FORM, path, overrides)
    if cfg["task"] not in TASKS:
        raise ValueError(f"unknown task {cfg['task']!r}; available: {', '.join(TASKS)}")
    if cfg["method"] not in METHODS:
        raise ValueError(f"unknown method {cfg['method']!r}; available: {', '.join(METHODS)}")
    if cfg["data"]["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {cfg['data']['preset']!r}; available: {', '.join(PRESETS)}")
    if cfg["classification"]["class_weights"] not in ("auto", "none", None):
        raise ValueError("classification.class_weights must be 'auto' or 'none'")
    return cfg


# ------------------------------------------------------------------------ data
def _transform(cfg: dict, train: bool):
    """Training: the preset at the encoder's size with its augmentation/random crop. Evaluation: 2D
    resized to the same size; 3D segmentation keeps the whole resampled volume (sliding window)."""
    d, enc = cfg["data"], cfg["encoder"]
    size = enc["img_size"]
    if not train and cfg["task"] == "segmentation" and enc["spatial_dims"] == 3:
        size = None
    return PRESETS[d["preset"]](size=size, train=train and d["augment"], **d["preset_args"])


def open_split(cfg: dict, split: str | None, train: bool = False, path: str | None = None):
    """One split of the recipe's data with its labels (classification) or masks (segmentation)."""
    d = cfg["data"]
    kw: dict = dict(spatial_dims=cfg["encoder"]["spatial_dims"], transform=_transform(cfg, train), cache=d["cache"])
    path = str(path or d["path"])
    if not path.lower().endswith(".npz"):
        if cfg["task"] == "classification":
            c = cfg["classification"]
            if not c["label"]:
                raise ValueError("classification on a manifest needs classification.label (the label column)")
            kw.update(label=c["label"], classes=c["classes"], multi_label=c["multi_label"])
        else:
            kw.update(mask_key=cfg["segmentation"]["mask"])
    elif cfg["task"] == "segmentation":
        raise ValueError(f"{path}: segmentation needs a manifest with a mask column, not an npz")
    return open_dataset(path, split=split, **kw)


def dataset_labels(ds) -> np.ndarray:
    """All labels of a labelled dataset without loading images: (N,) ints or (N, K) multi-hot."""
    if getattr(ds, "labels", None) is not None:  # npz
        return np.asarray(ds.targets)
    if hasattr(ds, "records"):
        missing = next((r for r in ds.records if r.label is None), None)
        if missing is not None:
            raise DataError(f"{ds.manifest} line {missing.line}: no label")
        return np.stack([np.asarray(r.label) for r in ds.records])
    raise DataError(f"{ds}: has no labels")


class TrainSet(Dataset):
    """Keys ``(index, position)`` (from :class:`medfm.pretrain.views.StepSampler`) -> the sample with its
    random transforms seeded by the position, so augmentation does not depend on workers or resume."""

    KEYS = ("image", "label", "mask", "features")

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        from medfm.data.volume import plain_tensor
        from medfm.pretrain.views import position_seed

        index, position = key
        base = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        post = getattr(base, "post", None)
        if post is not None:
            post.set_random_state(seed=position_seed(self.seed, position))
        sample = self.dataset[index]
        return {k: plain_tensor(v) if torch.is_tensor(v) else v for k, v in sample.items() if k in self.KEYS}


class _Features(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.features[i], "label": self.labels[i]}


# ---------------------------------------------------------------------- model
def build_task_model(cfg: dict, pretrained: bool = True) -> torch.nn.Module:
    """Encoder (``encoder.pretrained`` loaded when ``pretrained``), adapted by ``method``, plus the task's head."""
    from medfm.encoders import create_encoder
    from medfm.tasks.classification import ClassificationModel
    from medfm.tasks.segmentation import SegmentationModel

    kw = dict(cfg["encoder"])
    name = kw.pop("name")
    if not pretrained:
        kw["pretrained"] = None
    encoder = create_encoder(name, **kw)
    encoder = adapt_encoder(encoder, cfg["method"], lora=cfg["lora"], vpt=cfg["vpt"])
    if cfg["task"] == "classification":
        return ClassificationModel(encoder, _num_classes(cfg), cfg["classification"]["dropout"],
                                   standardize=cfg["classification"]["head_norm"])
    s = cfg["segmentation"]
    return SegmentationModel(encoder, s["num_classes"], s["feature_size"])


def _num_classes(cfg: dict) -> int:
    n = cfg["classification"]["num_classes"]
    if not n:
        raise ValueError("classification.num_classes is not known yet (it is set from the training data)")
    return n


def _optim(cfg: dict) -> dict:
    return dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"],
                layer_decay=cfg["full"]["layer_decay"] if cfg["method"] == "full" else None)


# --------------------------------------------------------------------- running
def _class_names(cfg: dict, ds) -> list[str]:
    names = getattr(ds, "classes", None) or cfg["classification"]["classes"]
    return [str(c) for c in names] if names else [str(i) for i in range(cfg["classification"]["num_classes"])]


def run_finetune(cfg: dict, out: str | os.PathLike, data_path: str | None = None, resume: bool = False,
                 callbacks: Sequence[L.Callback] = ()) -> Path:
    """Fine-tune the recipe's encoder on its task; evaluate; export. Returns the run folder."""
    from medfm.evaluate.probe import embed_dataset
    from medfm.finetune.fewshot import few_shot_indices
    from medfm.tasks.classification import ClassificationTask, class_weights
    from medfm.tasks.segmentation import SegmentationTask

    out = Path(out)
    ckpt = prepare_run_folder(out, resume)
    if data_path:
        cfg = merge(cfg, {"data": {"path": str(data_path)}}, FREE_FORM)
    d = cfg["data"]
    if not d["path"]:
        raise ValueError("fine-tuning needs data: give --data PATH (an npz or a manifest) or set data.path")
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    t0 = time.perf_counter()
    train = open_split(cfg, d["train_split"], train=True)
    cls = cfg["task"] == "classification"
    if cls:
        labels = dataset_labels(train)
        c = cfg["classification"]
        n_cls = labels.shape[1] if labels.ndim == 2 else int(max(labels.max() + 1, len(getattr(train, "classes", []) or [])))
        cfg = merge(cfg, {"classification": {"num_classes": c["num_classes"] or max(n_cls, 2)}}, FREE_FORM)
    if cfg["shots"]:
        if not cls:
            raise ValueError("shots (few-shot sampling) applies to classification")
        idx = few_shot_indices(labels, cfg["shots"], cfg["seed"])
        train = Subset(train, idx)
        labels = labels[idx]
    model = build_task_model(cfg)
    trainable, total = count_parameters(model)
    print(f"{cfg['task']} / {cfg['method']}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f} %), {len(train)} training samples")
    optim = _optim(cfg)
    if cls:
        weight = None
        if c["class_weights"] == "auto":
            weight = class_weights(torch.as_tensor(labels), cfg["classification"]["num_classes"], c["multi_label"])
        task = ClassificationTask(model, multi_label=c["multi_label"], weight=weight, **optim)
        if cfg["method"] == "linear_probe":  # frozen encoder: features computed once, the head trains on them
            plain = open_split(cfg, d["train_split"], train=False)
            if cfg["shots"]:
                plain = Subset(plain, idx)
            train = _Features(*embed_dataset(model.encoder, plain, progress="caching features"))
    else:
        task = SegmentationTask(model, frozen_encoder=cfg["method"] == "linear_probe", **optim)
    data = StepData(TrainSet(train, cfg["seed"]), len(train), d["batch_size"], d["num_workers"], cfg["seed"])
    trainer = make_trainer(cfg["trainer"], out, callbacks)
    if trainer.is_global_zero:
        with open(out / "recipe.yaml", "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    trainer.fit(task, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    train_time = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return out
    save_model(model, out)
    metrics = {"task": cfg["task"], "method": cfg["method"], "encoder": cfg["encoder"]["name"],
               "pretrained": cfg["encoder"]["pretrained"], "shots": cfg["shots"], "steps": trainer.global_step,
               "trainable_params": trainable, "total_params": total, "train_time_s": round(train_time, 1)}
    metrics.update(evaluate_splits(model, cfg, out))
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_json(out / "metrics.json", metrics)
    return out


def evaluate_splits(model, cfg: dict, out: Path, data_path: str | None = None, splits: Sequence[str] | None = None,
                    thresholds: list[float] | None = None) -> dict:
    """Metrics and figures for the validation split (choosing thresholds) and the test split, where they exist."""
    d = cfg["data"]
    results: dict = {}
    wanted = splits or [d["val_split"], d["test_split"]]
    for split in wanted:
        try:
            ds = open_split(cfg, split, train=False, path=data_path)
        except DataError as e:
            if splits:  # asked for explicitly
                raise
            print(f"split {split!r} not evaluated: {e}")
            continue
        if len(ds) == 0:
            continue
        if cfg["task"] == "classification":
            res, thr = evaluate_classification(model, ds, cfg, out, split, thresholds)
            if split == d["val_split"] and thresholds is None:
                thresholds = thr
                res["selected_thresholds"] = thr
        else:
            res = evaluate_segmentation(model, ds, cfg, out, split)
        results[split] = res
    return results


@torch.no_grad()
def evaluate_classification(model, ds, cfg: dict, out: Path, split: str,
                            thresholds: list[float] | None = None) -> tuple[dict, list[float] | None]:
    """Scores on ``ds``; metrics at ``thresholds`` (default 0.5 / argmax) plus the Youden thresholds of
    this split; ROC and confusion-matrix PNGs."""
    from medfm.evaluate.plots import confusion_png, roc_png
    from medfm.evaluate.probe import embed_dataset
    from medfm.tasks.classification import classification_metrics, scores_from_logits, select_thresholds

    multi = cfg["classification"]["multi_label"]
    logits, target = embed_dataset(model, ds, cfg["data"]["batch_size"])  # class logits instead of embeddings
    scores = scores_from_logits(logits, multi)
    names = _class_names(cfg, ds)
    res = classification_metrics(scores, target, multi, thresholds, names)
    thr = select_thresholds(scores, target, multi)
    roc_png(scores, target, names, out / f"roc_{split}.png", multi, title=f"{split}: AUROC {res['auroc']:.3f}")
    if not multi:
        k = scores.shape[1]
        pred = (scores[:, 1] >= (thresholds or [0.5])[0]).long() if k == 2 else scores.argmax(1)
        confusion_png(pred, target, names, out / f"confusion_{split}.png",
                      title=f"{split}: accuracy {res['accuracy']:.3f}")
    return res, thr


@torch.no_grad()
def evaluate_segmentation(model, ds, cfg: dict, out: Path, split: str) -> dict:
    """Sliding-window prediction of every volume/image of ``ds``; Dice / HD95 per class; overlays and
    (3D) NIfTI predictions with the affine of the preprocessed input."""
    from medfm.evaluate.plots import overlay_png
    from medfm.tasks.segmentation import check_mask, predict, save_prediction_nifti, segmentation_metrics

    s, enc = cfg["segmentation"], cfg["encoder"]
    k = s["num_classes"]
    names = s["class_names"] or ["background"] + [f"class {i}" for i in range(1, k)]
    roi = tuple(enc["img_size"]) if isinstance(enc["img_size"], (list, tuple)) else (enc["img_size"],) * enc["spatial_dims"]
    device = next(model.parameters()).device
    per_case, figs = [], ([], [], [])
    pred_dir = out / f"predictions_{split}"
    for i in range(len(ds)):
        sample = ds[i]
        image = torch.as_tensor(sample["image"])[None].to(device)
        target = torch.as_tensor(sample["mask"])[None]
        check_mask(target, k, f"{ds.describe(i)} (mask)" if hasattr(ds, "describe") else "mask")
        pred = predict(model, image, roi, s["overlap"], s["sw_batch_size"]).argmax(1, keepdim=True).cpu()
        spacing = sample["meta"].get("spacing")
        per_case.append(segmentation_metrics(pred, target, k, names, spacing=spacing, hd95=s["hd95"]))
        if enc["spatial_dims"] == 3 and "affine" in sample["meta"]:
            pred_dir.mkdir(exist_ok=True)
            save_prediction_nifti(pred[0], sample["meta"]["affine"], pred_dir / f"case{i:04d}.nii.gz")
        if i < 4:
            for lst, x in zip(figs, (image[0].cpu(), pred[0], target[0])):
                lst.append(x)
    res = _mean_case_metrics(per_case)
    res["n"] = len(per_case)
    overlay_png(*figs, out / f"overlay_{split}.png", k, title=f"{split}: mean Dice {res['mean_dice']:.3f}")
    return res


def _mean_case_metrics(cases: list[dict]) -> dict:
    out: dict = {}
    for key in cases[0]:
        if isinstance(cases[0][key], dict):
            out[key] = {c: float(np.nanmean([m[key][c] for m in cases])) for c in cases[0][key]}
        else:
            out[key] = float(np.nanmean([m[key] for m in cases]))
    return out


# --------------------------------------------------------------------- saving
def save_model(model: torch.nn.Module, out: Path) -> None:
    """``model.safetensors`` (whole task model, atomically), ``encoder/`` (plain, merged) and, for LoRA,
    ``adapter/`` (peft's adapter folder)."""
    from safetensors.torch import save_model as save_st

    from medfm.pretrain.callbacks import save_encoder_atomically

    with atomic_path(out / "model.safetensors") as tmp:
        save_st(model, str(tmp))
    save_encoder_atomically(export_encoder(model.encoder), out / "encoder")
    if is_lora(model.encoder):
        model.encoder.save_pretrained(str(out / "adapter"))


def load_run(run: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The fine-tuned task model of a run folder (rebuilt from its ``recipe.yaml``, weights from
    ``model.safetensors``, strictly) and its recipe."""
    from safetensors.torch import load_model

    run = Path(run)
    for f in ("recipe.yaml", "model.safetensors"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run / f}: not a finished fine-tuning run (missing {f})")
    cfg = load_task_recipe(overrides={})
    cfg = merge(cfg, yaml.safe_load((run / "recipe.yaml").read_text()), FREE_FORM)
    model = build_task_model(cfg, pretrained=False)
    load_model(model, str(run / "model.safetensors"), strict=True)  # raises on any missing/unexpected key
    return model.eval(), cfg


def evaluate_run(run: str | os.PathLike, data_path: str | None = None, split: str = "test",
                 out: str | os.PathLike | None = None) -> dict:
    """Evaluate a finished run on ``split`` of ``data_path`` (default: the run's data), with the thresholds
    chosen on its validation split; writes ``metrics.json`` and figures into ``out`` (default RUN/eval_<split>)."""
    run = Path(run)
    model, cfg = load_run(run)
    out = Path(out) if out else run / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    thresholds = None
    if (run / "metrics.json").exists():
        val = json.loads((run / "metrics.json").read_text()).get(cfg["data"]["val_split"], {})
        thresholds = val.get("selected_thresholds")
    res = evaluate_splits(model, cfg, out, data_path=data_path, splits=[split], thresholds=thresholds)
    metrics = {"run": str(run), "data": str(data_path or cfg["data"]["path"]), **res}
    write_json(out / "metrics.json", metrics)
    return metrics
