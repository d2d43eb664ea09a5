"""The segmentation task: a UNETR-style decoder for token encoders (ViTs), a U-Net-style decoder for pyramid
encoders (CNNs), 2D and 3D from one code path, in one module: recipe section, model, training module,
metrics and evaluation, plug-in.

The encoder's ``forward_intermediates`` gives feature maps; each becomes the
skip connection of one decoder level (stride 1 from the image itself, then
strides 2, 4, ... up to the encoder's total stride). ViT token maps are brought
to their level's resolution with MONAI's ``UnetrPrUpBlock`` (transposed
convolutions, as in UNETR: Hatamizadeh et al., WACV 2022); CNN maps already
have them and are only projected. Decoding is MONAI's ``UnetrUpBlock``
(upsample, concatenate the skip, residual convolutions) at every level, then a
1x1 convolution to class logits. Training uses MONAI's Dice + cross-entropy;
volumes larger than the training patch are predicted with MONAI's sliding-window
inference; Dice and HD95 come from MONAI's metrics.

Recipe section ``segmentation`` (:class:`SegmentationConfig`). Training draws random patches of the
encoder's input size; evaluation predicts whole images and volumes with a sliding window.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose, KeepLargestConnectedComponent, ResampleToMatch
from PIL import Image
from monai.utils import ensure_tuple_rep

from medfm.data import DataError
from medfm.data.preprocess import Preprocess
from medfm.data.fingerprint import recipe_resampling_note
from medfm.data.volume import plain_tensor
from medfm.data.writers import write_nifti
from medfm.evaluate.plots import overlay_png
from medfm.progress import progress_bar
from medfm.run import TrainingModule, evaluating

from medfm.heads import (BACKBONE_FAMILIES, FrozenEncoder, SegmentationModel, deep_supervision_weights,
                         encoder_and_head_groups)

from .base import FinetuneTask, validation_metrics
from .planning import unet_stages
from .recipe import run_recipe
from .registry import TASKS


class MaskLabels:
    """A dictionary transform that checks a sample's label map against the recipe's classes as it is loaded,
    naming the mask file (the dataset adds the manifest line): put first, before resampling."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, sample: dict) -> dict:
        if "mask" in sample:
            where = sample.get("meta", {}).get("mask_path", "mask")
            check_mask(torch.as_tensor(sample["mask"]), self.num_classes, str(where))
        return sample


def check_mask(mask: torch.Tensor, num_classes: int, where: str = "mask") -> None:
    """A clear error for a mask holding labels outside ``0 .. num_classes-1``."""
    bad = torch.unique(mask[(mask < 0) | (mask >= num_classes) | (mask != mask.round())])
    if len(bad):
        raise DataError(f"{where}: label value(s) {bad[:5].tolist()} outside the recipe's classes "
                        f"0..{num_classes - 1} (set segmentation.num_classes, or check the mask file)")


class SegmentationModule(FrozenEncoder, TrainingModule):
    """Lightning module: a :class:`SegmentationModel` trained with MONAI's Dice + cross-entropy on
    ``image`` / ``mask`` batches (random patches)."""

    def __init__(self, model: SegmentationModel, layer_decay: float | None = None, frozen_encoder: bool = False,
                 **optim):
        super().__init__(**optim)
        self.model = model
        self.layer_decay, self.frozen_encoder = layer_decay, frozen_encoder
        self.criterion = DiceCELoss(to_onehot_y=True, softmax=True)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def param_groups(self) -> list[dict]:
        return encoder_and_head_groups(self, self.layer_decay)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = batch["mask"]
        check_mask(mask, self.model.num_classes, "training batch")  # files are checked as they load (MaskLabels)
        logits = self.model(batch["image"])
        if logits.ndim == mask.ndim + 1:  # deep supervision: (B, heads, K, *spatial), every head at full size
            heads = logits.unbind(1)
            losses = [self.criterion(h.float(), mask) for h in heads]
            return sum(w * v for w, v in zip(deep_supervision_weights(len(heads)), losses)), {"loss_full": losses[0]}
        return self.criterion(logits.float(), mask), {}


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a (B, C, *spatial) tensor, the empty one first: nnU-Net's test-time
    mirroring (4 passes in 2D, 8 in 3D)."""
    return [tuple(2 + a for a in axes) for r in range(spatial_dims + 1)
            for axes in itertools.combinations(range(spatial_dims), r)]


@torch.no_grad()
def predict(model: SegmentationModel, image: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.25,
            sw_batch_size: int = 4, mirror: bool = False) -> torch.Tensor:
    """Class probabilities (B, K, *spatial) for images of any size: MONAI sliding-window inference over
    ``roi_size`` windows (Gaussian-blended), padded where the image is smaller than a window. ``mirror``: the
    logits averaged over the image flipped along every subset of its axes (nnU-Net's test-time augmentation;
    costs 4x in 2D, 8x in 3D)."""
    passes = mirror_axes(image.ndim - 2) if mirror else [()]
    total = None
    with evaluating(model):
        for axes in passes:
            x = image.flip(axes) if axes else image
            logits = torch.as_tensor(sliding_window_inference(x, roi_size, sw_batch_size, model, overlap=overlap,
                                                              mode="gaussian")).float()
            logits = logits.flip(axes) if axes else logits
            total = logits if total is None else total + logits
    return (total / len(passes)).softmax(1)


def largest_component(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """A (1, *spatial) label map with only the largest connected component of each class in ``classes`` kept
    (the rest of that class becomes background): MONAI's ``KeepLargestConnectedComponent``, nnU-Net's
    post-processing."""
    if not classes:
        return labels
    keep = KeepLargestConnectedComponent(applied_labels=list(classes), is_onehot=False, independent=True)
    return plain_tensor(keep(labels.clone())).to(labels.dtype)  # MONAI's filter writes into its input


def choose_postprocessing(raw: list[dict], lcc: list[dict], names: Sequence[str]) -> list[str]:
    """The classes whose mean Dice over the cases rises with the largest-component filter (nnU-Net keeps a
    post-processing step only where validation improves). ``raw`` / ``lcc``: per-case metrics without / with the
    filter on every class (one class's filter changes that class's voxels only, so the per-class choice is exact)."""
    return [n for n in names[1:] if _nanmean([m["dice"][n] for m in lcc]) > _nanmean([m["dice"][n] for m in raw])]


def _combined(raw: dict, lcc: dict, kept: Sequence[str]) -> dict:
    """One case's metrics with the filter applied to the ``kept`` classes only."""
    out = {}
    for key in ("dice", "hd95"):
        if key in raw:
            out[key] = {n: (lcc if n in kept else raw)[key][n] for n in raw[key]}
            out[f"mean_{key}"] = _nanmean(list(out[key].values()))
    return out


def segmentation_metrics(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                         class_names: Sequence[str] | None = None, spacing: Sequence[float] | None = None,
                         hd95: bool = True) -> dict:
    """Dice and HD95 (in ``spacing`` units, voxels if None) per foreground class and their mean.

    ``pred``, ``target``: (B, 1, *spatial) label maps. A class absent from both gets no Dice (NaN, left out
    of the mean); HD95 is NaN where either side is empty.
    """
    names = list(class_names or [str(i) for i in range(num_classes)])
    p, t = one_hot(pred.long(), num_classes), one_hot(target.long(), num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t).nanmean(0)
    out: dict = {"dice": {n: float(v) for n, v in zip(names[1:], dice)}, "mean_dice": float(dice.nanmean())}
    if hd95:
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        kw = {"spacing": list(spacing)} if spacing is not None else {}
        with warnings.catch_warnings():  # MONAI warns about its own internal argument, and about empty
            warnings.simplefilter("ignore", FutureWarning)  # classes, which come back as NaN (documented)
            warnings.filterwarnings("ignore", message="the (prediction|ground truth) of class")
            d = hd(p, t, **kw).nanmean(0)
        out["hd95"] = {n: float(v) for n, v in zip(names[1:], d)}
        out["mean_hd95"] = float(d.nanmean())
    return out


@torch.no_grad()
def evaluate_segmentation(model: SegmentationModel, ds, out: Path, split: str, roi_size: Sequence[int],
                          class_names: Sequence[str] | None = None, overlap: float = 0.25, sw_batch_size: int = 4,
                          hd95: bool = True, mirror: bool = False, postprocess: bool | Sequence[str] = False) -> dict:
    """Sliding-window prediction of every image/volume of ``ds`` (``mirror``: with test-time mirroring); Dice /
    HD95 per class (mean over cases); ``overlay_<split>.png`` and, for volumes, ``predictions_<split>/caseNNNN.nii.gz``
    (the affine of the preprocessed input) in ``out``.

    ``postprocess``: ``True`` chooses the classes whose largest-component filter raises Dice on these cases (the
    validation split), a list of class names applies it to those (the choice validation made), ``False`` none.
    The metrics are those of the predictions as post-processed; ``postprocessing`` in the result records the
    choice with the Dice of each class without and with the filter. The predictions are held as one byte per voxel
    until the choice is made."""
    k = model.num_classes
    names = list(class_names or ["background"] + [f"class {i}" for i in range(1, k)])
    device = next(model.parameters()).device
    raw, lcc, cases = [], [], []
    for i in range(len(ds)):
        sample = ds[i]
        image = torch.as_tensor(sample["image"])[None].to(device)
        target = torch.as_tensor(sample["mask"])[None]
        check_mask(target, k, f"{ds.describe(i)} (mask)" if hasattr(ds, "describe") else "mask")
        pred = predict(model, image, roi_size, overlap, sw_batch_size, mirror).argmax(1, keepdim=True).cpu()
        spacing = sample["meta"].get("spacing")
        raw.append(segmentation_metrics(pred, target, k, names, spacing=spacing, hd95=hd95))
        if postprocess:
            lcc.append(segmentation_metrics(largest_component(pred[0], range(1, k))[None], target, k, names,
                                            spacing=spacing, hd95=hd95))
        affine = sample["meta"].get("affine") if image.ndim == 5 else None
        cases.append((pred[0].to(torch.uint8), affine, (image[0].cpu(), target[0]) if i < 4 else None))
    kept = (choose_postprocessing(raw, lcc, names) if postprocess is True else list(postprocess)) if postprocess else []
    per_case = [_combined(r, c, kept) for r, c in zip(raw, lcc)] if kept else raw
    res = mean_case_metrics(per_case)
    res["n"] = len(per_case)
    if postprocess:
        res["postprocessing"] = {"largest_component": kept, "chosen_on": split if postprocess is True else "validation",
                                 "dice_without": mean_case_metrics(raw)["dice"], "dice_with": mean_case_metrics(lcc)["dice"]}
    classes = [names.index(n) for n in kept]
    pred_dir, figs = out / f"predictions_{split}", ([], [], [])
    for i, (pred, affine, shown) in enumerate(cases):
        pred = largest_component(pred, classes)
        if affine is not None:
            pred_dir.mkdir(exist_ok=True)
            write_nifti(pred[0].numpy(), pred_dir / f"case{i:04d}.nii.gz", affine)
        if shown is not None:
            for lst, x in zip(figs, (shown[0], pred, shown[1])):
                lst.append(x)
    overlay_png(*figs, out / f"overlay_{split}.png", k, title=f"{split}: mean Dice {res['mean_dice']:.3f}")
    return res


@torch.no_grad()
def predict_files(model, paths: Sequence[str | Path], out: str | Path, probabilities: bool = False,
                  overlap: float = 0.25, sw_batch_size: int = 4, mirror: bool = False,
                  largest_component_of: Sequence[str] = (), progress: str | None = None) -> list[Path]:
    """Label maps for images and volumes of any size, each written in its input's own space: NIfTI with the
    input's affine and voxel grid (orientation and spacing kept; the class probabilities are resampled from the
    model's grid with MONAI's ``ResampleToMatch``, then the argmax taken), PNG at the input's size for 2D.

    ``model``: a segmentation task model (``medfm.load(RUN/"model")``), whose spec holds the preprocessing it was
    trained with. ``probabilities``: also ``*_probs.nii.gz`` (X, Y, Z, K) / ``*_probs.npy``. ``mirror``: test-time
    mirroring; ``largest_component_of``: class names whose largest connected component alone is kept (what the
    run's validation chose: :func:`run_postprocessing`); ``progress``: a progress bar with that title. Returns the
    label files.
    """
    spec = model.spec
    enc = spec["encoder"]
    dims = enc["spatial_dims"]
    roi = ensure_tuple_rep(enc["img_size"], dims)
    preprocess = Preprocess.read(spec["preprocess"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    names = spec["head"].get("class_names") or ["background"] + [f"class {i}" for i in range(1, model.num_classes)]
    unknown = [n for n in largest_component_of if n not in names[1:]]
    if unknown:
        raise ValueError(f"largest_component_of: {unknown} not among the model's classes {names[1:]}")
    keep = [names.index(n) for n in largest_component_of]
    written = []
    for path in progress_bar(paths, desc=progress, unit="case", disable=progress is None):
        raw, image = preprocess.read_file(path, enc["in_chans"])
        probs = predict(model, plain_tensor(image)[None].to(device), roi, overlap, sw_batch_size, mirror)[0].cpu()
        stem = Path(path).name.split(".")[0]
        if dims == 3:
            back = ResampleToMatch(mode="bilinear", padding_mode="border")(
                MetaTensor(probs, affine=image.affine), img_dst=raw["image"])
            back = plain_tensor(back)
            affine = raw["meta"]["affine"]
            labels = largest_component(back.argmax(0, keepdim=True), keep)[0]
            target = write_nifti(labels.numpy().astype(np.uint8), out / f"{stem}_seg.nii.gz", affine)
            if probabilities:
                write_nifti(np.moveaxis(back.numpy(), 0, -1).astype(np.float32), out / f"{stem}_probs.nii.gz", affine)
        else:
            back = torch.nn.functional.interpolate(probs[None], size=tuple(raw["image"].shape[1:]), mode="bilinear",
                                                   align_corners=False)[0]
            labels = largest_component(back.argmax(0, keepdim=True), keep)[0].numpy().astype(np.uint8)
            target = out / f"{stem}_seg.png"
            Image.fromarray(labels).save(target)
            if probabilities:
                np.save(out / f"{stem}_probs.npy", back.numpy().astype(np.float32))
        written.append(target)
    return written


def run_postprocessing(run: str | Path) -> list[str]:
    """The classes whose largest component alone a segmentation run keeps: what its validation chose (none for a
    bare model folder or a run that did not choose)."""
    run = Path(run)
    if not (run / "recipe.yaml").exists():
        return []
    return chosen_postprocessing(validation_metrics(run, run_recipe(run)["data"]["val_split"])) or []


def chosen_postprocessing(val_metrics: dict) -> list[str] | None:
    """The classes validation kept the largest-component filter for (``postprocessing`` in its metrics)."""
    return (val_metrics.get("postprocessing") or {}).get("largest_component")


def mean_case_metrics(cases: list[dict]) -> dict:
    """The mean over cases of every metric (NaNs left out), per class where the metric is per class. A class
    with no value in any case (never predicted, or absent from every mask: HD95 is undefined there) stays NaN
    and is named under ``not_measured`` instead of warning "Mean of empty slice"."""
    out: dict = {}
    missing: dict[str, list[str]] = {}
    for key in cases[0]:
        if isinstance(cases[0][key], dict):
            out[key] = {}
            for c in cases[0][key]:
                out[key][c] = _nanmean([m[key][c] for m in cases])
                if math.isnan(out[key][c]):
                    missing.setdefault(key, []).append(c)
        else:
            out[key] = _nanmean([m[key] for m in cases])
    if missing:
        out["not_measured"] = missing
    return out


def _nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN (quietly) when none is."""
    known = [v for v in values if not math.isnan(v)]
    return float(np.mean(known)) if known else float("nan")


# ----------------------------------------------------------------- the plug-in
NETWORKS = ("unetr", "dynunet", "segresnet", "swinunetr", "auto")
# a MONAI network's encoder family from random initialisation, when the recipe names another encoder
FAMILY_DEFAULTS = {"segres_encoder": {"init_filters": 16}, "swin_vit": {"feature_size": 24, "depths": [2, 2, 2, 2],
                                                                      "num_heads": [3, 6, 12, 24], "window_size": 7}}


def resolve_network(cfg: dict) -> list[str]:
    """``segmentation.network`` made concrete in ``cfg``, with the encoder and patch it needs; returns the changes
    as lines a user reads.

    * ``auto``: the network the encoder's family has (``segres_encoder`` -> ``segresnet``, ``swin_vit`` ->
      ``swinunetr``: MONAI's own, random or pretrained, as ``--profile cpu`` trains 3D from random init); any other
      encoder: ``unetr`` when pretrained, ``dynunet`` (nnU-Net's, no medfm encoder) from random initialisation.
    * ``segresnet`` / ``swinunetr`` from random initialisation: a recipe's other encoder is replaced by the
      network's own family (SegResNet: as many levels as the patch halves to >= 4 voxels, at most 5); pretrained
      weights of another family are an error. The patch is rounded up to the encoder's total stride.
    """
    s, enc = cfg["segmentation"], cfg["encoder"]
    said, pretrained = [], bool(enc.get("pretrained"))
    if s["network"] not in NETWORKS:
        raise ValueError(f"segmentation.network={s['network']!r}: one of {', '.join(NETWORKS)}")
    if s["network"] == "auto":
        own = {v: k for k, v in BACKBONE_FAMILIES.items()}.get(enc["name"])
        s["network"] = own or ("unetr" if pretrained else "dynunet")
        why = (f"the {enc['name']} encoder's own network" if own else
               f"a pretrained {enc['name']}" if pretrained else "random initialisation, no medfm encoder")
        said.append(f"segmentation.network auto -> {s['network']} ({why})")
    family = BACKBONE_FAMILIES.get(s["network"])
    if family is None:
        return said
    dims = enc["spatial_dims"]
    patch = list(ensure_tuple_rep(enc["img_size"], dims))
    if enc["name"] != family:
        if pretrained:
            raise ValueError(f"segmentation.network={s['network']} takes a {family} encoder (MONAI's own); the "
                             f"weights given ({enc['pretrained']}) are a {enc['name']}: use network unetr or auto")
        args = dict(FAMILY_DEFAULTS[family])
        if family == "segres_encoder":
            downs = max(1, min(4, min(int(math.log2(max(p, 8) / 4)) for p in patch)))
            args["blocks_down"] = [1, 2, 2, 4, 4][:downs + 1]
        cfg["encoder"] = enc = {"name": family, "spatial_dims": dims, "in_chans": enc["in_chans"],
                                "img_size": enc["img_size"], "pretrained": None, **args}
        said.append(f"encoder: {family} ({', '.join(f'{k} {v}' for k, v in args.items())}) from random "
                    f"initialisation, the encoder segmentation.network={s['network']} is built around")
    stride = 32 if family == "swin_vit" else 2 ** (len(enc.get("blocks_down") or (1, 2, 2, 4, 4)) - 1)
    least = 64 if family == "swin_vit" else stride  # SwinUNETR's 1-voxel bottleneck at 32 cannot instance-normalise
    fitted = [max(least, int(math.ceil(p / stride) * stride)) for p in patch]
    if fitted != patch:
        enc["img_size"] = fitted
        said.append(f"encoder.img_size {patch} -> {fitted} (segmentation.network={s['network']} needs sizes "
                    f"divisible by {stride}" + (", at least 64)" if least == 64 else ")"))
    return said


@dataclass
class SegmentationConfig:
    """``segmentation`` recipe section."""

    num_classes: int = 2  # including background (label 0)
    class_names: list | None = None
    mask: str = "mask"  # manifest column of the label maps
    # unetr: any medfm encoder + UNETR / U-Net decoder | dynunet: MONAI's DynUNet (nnU-Net), whole, random init |
    # segresnet: MONAI's SegResNetDS around a segres_encoder | swinunetr: MONAI's SwinUNETR around a swin_vit |
    # auto: the encoder family's own MONAI network (segres_encoder, swin_vit), else dynunet from random init and
    # unetr for pretrained weights (resolve_network)
    network: str = "unetr"
    kernel_size: list | None = None  # dynunet: per stage (the plan's; None: 3 everywhere)
    strides: list | None = None  # dynunet: per stage (the plan's; None: halve each axis while it stays >= 4)
    deep_supervision: bool = True  # dynunet, segresnet: nnU-Net's 1/2^i-weighted losses of the coarser outputs
    feature_size: int = 16  # decoder width at full resolution (doubles per level); dynunet: its first stage;
    # segresnet / swinunetr: the encoder's widths set the decoder's
    overlap: float = 0.25  # sliding-window overlap at evaluation
    sw_batch_size: int = 4
    hd95: bool = True
    mirror: bool = False  # test-time mirroring at evaluation (nnU-Net's; costs 4x in 2D, 8x in 3D)
    postprocess: bool = True  # largest connected component per class, kept for the classes where validation Dice rises


def _check_dynunet(cfg: dict) -> None:
    """A DynUNet has no medfm encoder: it trains whole (method full) from random initialisation."""
    if cfg["segmentation"]["network"] == "dynunet" and (cfg["method"] != "full" or cfg["encoder"].get("pretrained")):
        raise ValueError("segmentation.network=dynunet trains MONAI's DynUNet whole from random initialisation "
                         "(method full, no --encoder; network auto chooses it for a random ViT); a pretrained medfm "
                         "encoder or a tuning method goes under network unetr, segresnet or swinunetr")


@TASKS.register
class SegmentationTask(FinetuneTask):
    name = "segmentation"
    Config = SegmentationConfig
    model_class = SegmentationModel
    headline = ("mean_dice", "mean_hd95")

    def eval_size(self, cfg: dict):
        """3D: the whole resampled volume (sliding window); 2D: the encoder's size."""
        return None if cfg["encoder"]["spatial_dims"] == 3 else cfg["encoder"]["img_size"]

    def transform(self, cfg: dict, train: bool):
        """The preset, after a check of every label map against the recipe's classes (names the file)."""
        preset = super().transform(cfg, train)
        return Compose([MaskLabels(self.config(cfg).num_classes), *preset.transforms])

    def split_args(self, cfg: dict, path: str) -> dict:
        if path.lower().endswith(".npz"):
            raise ValueError(f"{path}: segmentation needs a manifest with a mask column, not an npz")
        return {"mask_key": self.config(cfg).mask}

    def validate(self, cfg: dict) -> None:
        super().validate(cfg)
        s = self.config(cfg)
        if s.network not in NETWORKS:
            raise ValueError(f"segmentation.network={s.network!r}: one of {', '.join(NETWORKS)}")
        _check_dynunet(cfg)

    def resolve(self, cfg: dict) -> dict:
        """``network: auto`` and the encoder a MONAI network is built around (:func:`resolve_network`)."""
        for line in resolve_network(cfg):
            print(line)
        _check_dynunet(cfg)  # auto may have become a DynUNet: a tuning method other than full cannot apply to it
        return cfg

    def prepare(self, cfg: dict, train, state: dict):
        """Says in one line when the recipe resamples a volume set far from its native spacing."""
        d = self.section(cfg, "data")
        note = recipe_resampling_note(d.path, d.preset, d.preset_args, d.train_split) \
            if cfg["encoder"]["spatial_dims"] == 3 else None
        if note:
            warnings.warn(note, stacklevel=2)
        return cfg, train

    def head(self, cfg: dict, state: dict) -> dict:
        s, enc = self.config(cfg), cfg["encoder"]
        head = {"num_classes": s.num_classes, "feature_size": s.feature_size, "class_names": s.class_names}
        if s.network == "dynunet":
            patch = list(ensure_tuple_rep(enc["img_size"], enc["spatial_dims"]))
            kernels, strides = unet_stages(patch)
            head.update(network="dynunet", kernel_size=s.kernel_size or kernels, strides=s.strides or strides,
                        deep_supervision=s.deep_supervision)
        elif s.network in BACKBONE_FAMILIES:
            head.update(network=s.network, deep_supervision=s.deep_supervision)
        return head

    def module(self, cfg: dict, model, train, state: dict):
        return SegmentationModule(model, frozen_encoder=self.frozen_encoder(cfg), **self.optim(cfg))

    def export(self, module, folder, trainer, built) -> None:
        """``model/``; a DynUNet has no medfm encoder to export beside it."""
        if module.model.encoder is None:
            folder.save(module.model, "model")
            return
        super().export(module, folder, trainer, built)

    evaluate_options = (*FinetuneTask.evaluate_options, "mirror")

    def evaluate(self, run: Path, data: str | None = None, split: str = "test", out: str | None = None,
                 robustness: str | None = None, mirror: bool = False) -> dict:
        """:meth:`FinetuneTask.evaluate`, and ``mirror``: predict with test-time mirroring."""
        return self.run_evaluation(run, data, split, out, robustness, mirror=bool(mirror))

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        """Validation chooses the post-processing (largest component per class, where it raises Dice); the other
        splits apply that choice."""
        s, enc = self.config(cfg), cfg["encoder"]
        roi = ensure_tuple_rep(enc["img_size"], enc["spatial_dims"])
        choose = s.postprocess and split == state["val_split"]  # never chosen on a held-out split
        post = True if choose else (state.get("largest_component") or False) if s.postprocess else False
        res = evaluate_segmentation(model, ds, out, split, roi, s.class_names, s.overlap, s.sw_batch_size, s.hd95,
                                    s.mirror or bool(state.get("mirror")), post)
        if choose and split == state["val_split"]:
            state["largest_component"] = res["postprocessing"]["largest_component"]
        return res

    def saved_state(self, val_metrics: dict) -> dict:
        return {"largest_component": chosen_postprocessing(val_metrics)}
