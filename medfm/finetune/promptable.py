"""The promptable segmentation task: a SAM-layout model (:class:`medfm.heads.promptable.PromptableSAM`) fine-tuned
on a segmentation manifest as MedSAM and SAM-Med2D are, and scored with simulated prompts.

Training (:class:`PromptableModule`): each image of a batch gets one of the classes its mask holds as a binary
object (``promptable.classes``: the label values; by default every non-zero value of the training masks) and a
simulated prompt: a box around the object with each side moved outward by a random 0..``jitter`` pixels
(MedSAM), or one click inside it (SAM), followed by up to ``click_rounds`` correction clicks, each from the larger
error of the model's own current prediction with the previous round's logits as the mask prompt (SAM-Med2D's
interactive training; :func:`medfm.evaluate.prompts.next_click`). The loss is Dice + binary cross-entropy of the
final round's mask (MONAI's ``DiceCELoss``) plus the mean squared error of the predicted IoU against the mask's
actual IoU. Which parts train is the recipe's: the image encoder by the tuning method (``full``, ``lora``,
``linear_probe`` = frozen, ...), the prompt encoder (frozen by default, as MedSAM) and the mask decoder by
``promptable.train_prompt_encoder`` / ``train_mask_decoder``. ``promptable.from_model`` starts from a whole SAM or
MedSAM (a checkpoint, its ``medfm models convert`` folder, or an earlier promptable run).

Evaluation reads each validation image and mask from its file, as ``medfm segment`` reads a user's image, and
scores every object with a jittered ground-truth box and after 1, 3, 5 and 10 simulated clicks
(:func:`medfm.evaluate.prompts.prompted_scores`): Dice and NSD per prompt, per class, the CPU time per image
encoding and per prompt, and ``prompted_<split>.html`` with overlays. Training images are prepared as the model
prepares a user's image: min-max scaled (the preset's percentiles 0 and 100) and resized square (MedSAM's
convention, recorded as the model's ``resize: square``).

The native 3D task (``promptable_3d``, :class:`PromptableVolumeTask`, ``tasks/promptable_3d.yaml``) trains a
:class:`~medfm.heads.promptable_volume.PromptableVolume` (a 3D encoder, clicks in the volume) on patches around
its objects with simulated click rounds, and scores 1, 3, 5 and 10 clicks per object (:func:`evaluate_clicked`).
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.utils import ensure_tuple_rep
from PIL import Image
from torch.utils.data import Subset

from medfm.data import DataError, load, load_mask, read_records, split_names
from medfm.data.fingerprint import recipe_resampling_note
from medfm.data.writers import write_manifest
from medfm.evaluate.prompts import (box_from_mask, click_scores, dice, next_click, next_voxel_click, prompted_page,
                                    prompted_scores)
from medfm.heads import FrozenEncoder, encoder_and_head_groups
from medfm.heads.promptable import SAM_HEAD_KEYS, PromptableSAM, load_promptable, propagate
from medfm.heads.promptable_volume import PromptableVolume
from medfm.progress import progress_bar
from medfm.run import TrainingModule

from .base import FinetuneTask
from .registry import TASKS


@dataclass
class PromptableConfig:
    """``promptable`` recipe section."""

    mask: str = "mask"  # manifest column of the label maps
    classes: list | None = None  # label values, each trained and scored as a binary object (None: every non-zero
    # value found in the training masks)
    class_names: list | None = None  # one per class value (default: "class <value>")
    from_model: str | None = None  # a whole SAM / MedSAM to start from: checkpoint, converted folder or promptable run
    prompt_dim: int = 256  # the prompt encoder's and mask decoder's width (SAM: 256)
    decoder_depth: int = 2  # two-way transformer blocks (SAM: 2)
    decoder_mlp_dim: int = 2048  # their MLP width (SAM: 2048)
    decoder_heads: int = 8
    iou_hidden: int = 256  # the IoU-prediction head's width
    mask_in_chans: int = 16  # the mask prompt's downscaling channels
    train_prompt_encoder: bool = False  # MedSAM keeps it frozen
    train_mask_decoder: bool = True
    box_prob: float = 0.5  # share of training prompts that start from a box (the rest: one click in the object)
    jitter: int = 20  # training boxes: each side moved outward 0..jitter pixels of the model's frame (MedSAM: 0-20)
    click_rounds: int = 2  # up to this many simulated correction clicks before each step's loss (SAM-Med2D)
    iou_weight: float = 1.0  # weight of the IoU-prediction loss beside Dice + BCE
    eval_jitter: int = 5  # evaluation boxes: each side moved outward 0..eval_jitter pixels of the image
    eval_clicks: list = field(default_factory=lambda: [1, 3, 5, 10])  # click counts scored
    eval_max: int | None = 300  # at most this many objects scored per split (the first ones); None: all
    overlays: int = 6  # objects drawn on the HTML page


def _adopt_weights(model: nn.Module, source: nn.Module) -> int:
    """``source``'s weights copied into ``model`` by name, seen through a tuning method's wrapping (peft's
    ``base_model.model.`` and ``.base_layer``), so a whole SAM starts a LoRA run as it starts a full one. Returns
    how many tensors were copied; a shape that differs is an error naming the weight."""
    theirs = source.state_dict()
    ours = model.state_dict()
    plain = {k: re.sub(r"\.base_layer(?=\.)", "", k.replace("base_model.model.", "")) for k in ours}
    take = {}
    for k, name in plain.items():
        if name in theirs:
            if theirs[name].shape != ours[k].shape:
                raise ValueError(f"promptable.from_model: {name} is {tuple(theirs[name].shape)}, the recipe's model "
                                 f"has {tuple(ours[k].shape)}")
            take[k] = theirs[name]
    model.load_state_dict(take, strict=False)
    return len(take)


def pick_objects(masks: torch.Tensor, classes: list, rng: np.random.Generator) -> tuple[list[int], torch.Tensor]:
    """For each image or volume whose mask holds a class, one of them drawn at random as a binary target: the
    indices kept and the targets (B', 1, *spatial)."""
    keep, targets = [], []
    for b in range(len(masks)):
        present = [c for c in classes if bool((masks[b] == c).any())]
        if present:
            keep.append(b)
            targets.append(masks[b, 0] == present[rng.integers(len(present))])
    return keep, (torch.stack(targets)[:, None].float() if targets else masks[:0])


class PromptedModule(FrozenEncoder, TrainingModule):
    """What the 2D and 3D promptable modules share: the model, its object classes, Dice + BCE (MONAI's
    ``DiceCELoss``), the encoder's parameter groups, and each step's objects (:meth:`objects`)."""

    def __init__(self, model: nn.Module, classes: list, layer_decay: float | None = None,
                 frozen_encoder: bool = False, **optim):
        super().__init__(**optim)
        self.model, self.classes = model, [float(c) for c in classes]
        self.layer_decay, self.frozen_encoder = layer_decay, frozen_encoder
        self.criterion = DiceCELoss(sigmoid=True)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def param_groups(self) -> list[dict]:
        return encoder_and_head_groups(self, self.layer_decay)

    def objects(self, batch: dict) -> tuple[np.random.Generator, list[int], torch.Tensor]:
        """The step's random generator (drawn from the run's torch RNG, so a resumed run repeats it) and one
        object per sample that holds one (:func:`pick_objects`)."""
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        return (rng, *pick_objects(batch["mask"], self.classes, rng))

    def no_object(self) -> torch.Tensor:
        """The loss of a batch without an object (augmentation moved each out of view): a zero that keeps the graph."""
        return sum(p.sum() * 0 for p in self.model.parameters() if p.requires_grad)


class PromptableModule(PromptedModule):
    """Lightning module: a :class:`PromptableSAM` trained on ``image`` / ``mask`` batches with simulated prompts
    (see the module docstring)."""

    def __init__(self, model: PromptableSAM, classes: list, box_prob: float = 0.5, jitter: int = 20,
                 click_rounds: int = 2, iou_weight: float = 1.0, **kwargs):
        super().__init__(model, classes, **kwargs)
        self.box_prob, self.jitter, self.click_rounds, self.iou_weight = box_prob, jitter, click_rounds, iou_weight

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        rng, keep, targets = self.objects(batch)
        if not keep:
            return self.no_object(), {}
        images = batch["image"][keep]
        embeddings = self.model.image_embeddings(images)
        size = images.shape[-2:]
        logits, ious = [], []
        for i in range(len(keep)):
            truth = targets[i, 0].cpu().numpy() > 0
            box, points, labels = None, [], []
            if rng.random() < self.box_prob:
                box = torch.tensor([box_from_mask(truth, self.jitter, rng)], dtype=torch.float32, device=images.device)
            else:  # one click anywhere in the object (SAM's first point)
                ys, xs = np.nonzero(truth)
                j = rng.integers(len(xs))
                points, labels = [[float(xs[j]), float(ys[j])]], [1]
            mask_in = None
            for _ in range(int(rng.integers(0, self.click_rounds + 1))):
                with torch.no_grad():  # the model's own prediction, corrected by one click from its larger error
                    low, _ = self.model.decode(embeddings[i:i + 1].detach(), _points(points, labels, images.device),
                                               box, mask_in)
                    pred = F.interpolate(low, size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy() > 0
                click = next_click(pred, truth, seed=int(rng.integers(2**31 - 1)))
                if click is None:
                    break
                points.append(list(click[:2]))
                labels.append(click[2])
                mask_in = low
            low, iou = self.model.decode(embeddings[i:i + 1], _points(points, labels, images.device), box, mask_in)
            logits.append(low)
            ious.append(iou[:, 0])
        up = F.interpolate(torch.cat(logits), size, mode="bilinear", align_corners=False).float()
        seg = self.criterion(up, targets)
        with torch.no_grad():
            hard = up > 0
            inter = (hard & (targets > 0)).flatten(1).sum(1)
            union = (hard | (targets > 0)).flatten(1).sum(1)
            actual = inter / union.clamp_min(1)
        iou_loss = F.mse_loss(torch.cat(ious).float(), actual)
        return seg + self.iou_weight * iou_loss, {"loss_mask": seg.detach(), "loss_iou": iou_loss.detach()}


def _points(points: list, labels: list, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Clicks in the model's frame as the prompt encoder takes them ((1, N, 2), (1, N)); None without any."""
    if not points:
        return None
    return (torch.tensor([points], dtype=torch.float32, device=device),
            torch.tensor([labels], dtype=torch.int, device=device))


def mask_values(ds, where: str = "training", dims: int = 2) -> list[set]:
    """The label values of every row's mask (read from the files of a manifest dataset); a row without a mask holds
    no object ({0}: a normal image, as BUSI's)."""
    records = getattr(ds, "records", None)
    if records is None:
        raise DataError(f"promptable segmentation reads masks from a manifest (image and mask columns); the {where} "
                        "set is not one")
    out = []
    for rec in progress_bar(records, desc=f"{where} masks", unit="mask", leave=False):
        if rec.mask is None:
            out.append({0.0})
            continue
        m = load_mask(rec.mask, spatial_dims=dims)["image"]
        out.append({float(v) for v in torch.unique(torch.as_tensor(m)).tolist()})
    return out


def object_means(scores: list[dict], per_class: dict[str, list[dict]]) -> dict:
    """Each score's mean over the objects, and over each class's objects (``score/class``) where there are
    several classes."""
    keys = list(scores[0])
    res = {k: float(np.mean([s[k] for s in scores])) for k in keys}
    if len(per_class) > 1:
        for name, rows in per_class.items():
            res.update({f"{k}/{name}": float(np.mean([s[k] for s in rows])) for k in keys})
    return res


@torch.no_grad()
def evaluate_prompted(model: PromptableSAM, ds, classes: list, class_names: list, out: Path, split: str,
                      clicks: list, jitter: int = 5, max_objects: int | None = None, overlays: int = 6) -> dict:
    """Every object (one class of one image) of a manifest split, read from its files and scored with a jittered
    ground-truth box and after each click count (:func:`prompted_scores`); means over objects, per prompt, and
    per class with more than one; CPU seconds per image encoding and per prompt; ``prompted_<split>.html``."""
    records = getattr(ds, "records", None)
    if records is None:
        raise DataError("promptable evaluation reads a manifest split (image and mask columns)")
    scores, per_class, shown = [], {}, []
    encode_s = prompt_s = 0.0
    n_images = n_prompts = unmasked = 0
    bar = progress_bar(total=len(records), desc=f"prompts {split}", unit="image", leave=False)
    for i, rec in enumerate(records):
        bar.update(1)
        if max_objects is not None and len(scores) >= max_objects:
            break
        if rec.mask is None:  # no object to prompt for (a normal image)
            unmasked += 1
            continue
        truth_all = load_mask(rec.mask, spatial_dims=2)["image"][0].numpy()
        present = [c for c in classes if (truth_all == c).any()]
        if not present:
            continue
        image = load(rec.image, spatial_dims=2)["image"].numpy().transpose(1, 2, 0)
        t0 = time.process_time()
        embedded = model.embed(image)
        encode_s += time.process_time() - t0
        n_images += 1

        def predict(_, **prompt):
            nonlocal prompt_s, n_prompts
            t = time.process_time()
            res = model.predict(embedded, **prompt)
            prompt_s += time.process_time() - t
            n_prompts += 1
            return res

        for c in present:
            truth = truth_all == c
            res = prompted_scores(predict, image, truth, clicks=clicks, jitter=jitter, seed=i)
            name = class_names[classes.index(c)]
            flat = {f"{p}_{m}": v[m] for p, v in res.items() if isinstance(v, dict) and p != "shown" for m in v}
            scores.append(flat)
            per_class.setdefault(name, []).append(flat)
            if len(shown) < overlays:
                shown.append({"image": image, "truth": truth, "name": f"{Path(rec.image).name} ({name})", **res["shown"],
                              "scores": flat})
    bar.close()
    if not scores:
        raise DataError(f"split {split!r}: no mask holds any of the classes {classes}"
                        + (f" ({unmasked} of its {len(records)} rows have no mask)" if unmasked else ""))
    res = object_means(scores, per_class)
    res.update(n=len(scores), n_images=n_images, cpu_s_per_image=encode_s / max(n_images, 1),
               cpu_s_per_prompt=prompt_s / max(n_prompts, 1))
    prompted_page(shown, res, out / f"prompted_{split}.html", title=f"{split}: promptable segmentation")
    return res


# ------------------------------------------------------------------------------ volumes, slice by slice
def slice_manifest(volumes: Path, out: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A 3D segmentation manifest's volumes of ``splits`` as a 2D one the promptable recipe trains on: every slice
    along the last voxel axis that holds a label, shown as :func:`propagate` shows it (transposed), as PNG image
    (scaled by the volume's 0.5 / 99.5 percentiles) and label map under ``out``, each in its volume's split (the
    validation volumes' slices are what the run scores with prompts). Returns ``out/manifest.csv``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in [s for s in splits if s in split_names(volumes)]:
        for vol, lab, rec in _volumes(volumes, split):
            lo, hi = np.percentile(vol, [0.5, 99.5])
            vol = np.clip((vol - lo) / max(hi - lo, 1e-6), 0, 1)
            case = Path(rec.image).name.split(".")[0]
            for k in np.nonzero(lab.any((0, 1)))[0]:
                name = f"{case}_{k:03d}.png"
                Image.fromarray((vol[:, :, k].T * 255).round().astype(np.uint8)).save(out / f"img_{name}")
                Image.fromarray(lab[:, :, k].T.astype(np.uint8)).save(out / f"lab_{name}")
                rows.append({"image": f"img_{name}", "mask": f"lab_{name}", "split": split})
    if not rows:
        raise DataError(f"{volumes}: no volume of the splits {list(splits)} holds a label")
    return write_manifest(out / "manifest.csv", rows)


def propagated_scores(model: PromptableSAM, volumes: Path, split: str = "val") -> dict:
    """Each object (class) of each ``split`` volume of a 3D manifest segmented by :func:`propagate` from a box (no
    jitter) on its middle slice, as a user boxes a structure once: 3D Dice per class and their mean, CPU seconds
    per object."""
    head = getattr(model, "spec", {}).get("head", {})
    classes = head.get("classes") or [1.0]  # a converted SAM / MedSAM knows no classes: label 1
    names = head.get("class_names") or [f"class {c:g}" for c in classes]
    per_class: dict[str, list[float]] = {n: [] for n in names}
    cpu, n, cases = 0.0, 0, 0
    for vol, lab, _ in _volumes(volumes, split):
        cases += 1
        for c, name in zip(classes, names):
            truth = lab == c
            ks = np.nonzero(truth.any((0, 1)))[0]
            if not len(ks):
                continue
            k = int(ks[len(ks) // 2])
            t0 = time.process_time()
            pred = propagate(model, vol, k, box=box_from_mask(truth[:, :, k].T))
            cpu += time.process_time() - t0
            n += 1
            per_class[name].append(dice(pred, truth))
    out = {f"dice/{k}": float(np.mean(v)) for k, v in per_class.items() if v}
    out.update(mean_dice=float(np.mean([np.mean(v) for v in per_class.values() if v])), objects=n,
               cpu_s_per_object=cpu / max(n, 1), volumes=cases)
    return out


def _volumes(manifest: Path, split: str):
    """(volume, label map, record) of each row of a 3D manifest's ``split``, both (I, J, K) in the file's voxel
    order (medfm's readers: a missing or damaged file names itself)."""
    for rec in read_records(manifest, split=split, mask_key="mask")[0]:
        vol = load(rec.image, spatial_dims=3)["image"][0].numpy()
        yield vol, load_mask(rec.mask, spatial_dims=3)["image"][0].numpy(), rec


@TASKS.register
class PromptableTask(FinetuneTask):
    name = "promptable"
    Config = PromptableConfig
    model_class = PromptableSAM
    headline = ("box_dice", "click_1_dice", "click_3_dice", "click_5_dice")

    def split_args(self, cfg: dict, path: str) -> dict:
        if path.lower().endswith(".npz"):
            raise ValueError(f"{path}: promptable segmentation needs a manifest with a mask column, not an npz")
        return {"mask_key": self.config(cfg).mask}

    def validate(self, cfg: dict) -> None:
        super().validate(cfg)
        s, enc = self.config(cfg), cfg["encoder"]
        if enc["spatial_dims"] != 2:
            raise ValueError("promptable segmentation trains a 2D model (volumes are segmented slice by slice with "
                             "propagation: medfm segment --model RUN volume.nii.gz --box ... --slice K)")
        if not isinstance(enc["img_size"], int):
            raise ValueError(f"encoder.img_size={enc['img_size']}: the promptable model takes square images (one int)")
        if not 0.0 <= s.box_prob <= 1.0 or s.jitter < 0 or s.click_rounds < 0:
            raise ValueError("promptable: box_prob in [0, 1], jitter >= 0 and click_rounds >= 0")

    def resolve(self, cfg: dict) -> dict:
        """``from_model``: the whole SAM to start from is read (once) and its encoder section, image size and
        decoder sizes become the recipe's, before the data open at that size."""
        s = self.config(cfg)
        if s.from_model:
            self._source = load_promptable(s.from_model)
            head = self._source.spec["head"]
            cfg["encoder"] = {**self._source.spec["encoder"], "pretrained": None, "img_size": head["image_size"]}
            cfg["promptable"].update({k: head[k] for k in SAM_HEAD_KEYS if k in head and k not in ("image_size", "resize")})
        return cfg

    def prepare(self, cfg: dict, train, state: dict):
        """The classes from the training masks (where not given) and the training rows that hold one (MedSAM
        trains on images with an object)."""
        s = self.config(cfg)
        values = mask_values(train, dims=cfg["encoder"]["spatial_dims"])
        classes = [float(c) for c in s.classes] if s.classes else sorted({v for vs in values for v in vs} - {0.0})
        if not classes:
            raise DataError(f"{self.section(cfg, 'data').path}: no training mask holds a non-zero label")
        idx = [i for i, vs in enumerate(values) if vs & set(classes)]
        if not idx:
            raise DataError(f"no training mask holds any of promptable.classes {classes}")
        names = list(s.class_names or [f"class {c:g}" for c in classes])
        if len(names) != len(classes):
            raise ValueError(f"promptable.class_names has {len(names)} names for {len(classes)} classes {classes}")
        cfg = {**cfg, self.name: {**cfg[self.name], "classes": classes, "class_names": names}}
        print(f"{self.name}: {len(idx)} of {len(values)} training images hold an object of {names}")
        return cfg, Subset(train, idx)

    def head(self, cfg: dict, state: dict) -> dict:
        s = self.config(cfg)
        frozen = [p for p, trains in (("prompt_encoder", s.train_prompt_encoder), ("mask_decoder", s.train_mask_decoder))
                  if not trains]
        return {"image_size": cfg["encoder"]["img_size"], "resize": "square", "classes": s.classes,
                "class_names": s.class_names, "frozen": frozen,
                **{k: getattr(s, k) for k in SAM_HEAD_KEYS if hasattr(s, k)}}

    def module(self, cfg: dict, model, train, state: dict):
        s = self.config(cfg)
        if s.from_model:
            n = _adopt_weights(model, self._source)
            self._source = None
            print(f"promptable: {n} weights from {s.from_model}")
        return PromptableModule(model, s.classes, s.box_prob, s.jitter, s.click_rounds, s.iou_weight,
                                frozen_encoder=self.frozen_encoder(cfg), **self.optim(cfg))

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        s = self.config(cfg)
        return evaluate_prompted(model, ds, s.classes, s.class_names, out, split, list(s.eval_clicks), s.eval_jitter,
                                 s.eval_max, s.overlays)


# ------------------------------------------------------------------------------ native 3D: clicks in a volume
@dataclass
class PromptableVolumeConfig:
    """``promptable_3d`` recipe section (a 3D encoder: :class:`medfm.heads.promptable_volume.PromptableVolume`)."""

    mask: str = "mask"  # manifest column of the label maps
    classes: list | None = None  # label values, each trained and scored as a binary object (None: every non-zero)
    class_names: list | None = None
    feature_dim: int = 32  # the feature map the point head reads (a multiple of 8)
    decoder_width: int = 16  # the U-Net decoder's first level
    max_prompt: int = 16  # click sets decoded at once
    click_rounds: int = 4  # up to this many correction clicks after the first, simulated before each step's loss
    eval_clicks: list = field(default_factory=lambda: [1, 3, 5, 10])  # click counts scored
    eval_max: int | None = 100  # at most this many objects scored per split; None: all
    overlays: int = 6  # objects drawn on the HTML page (the slice through each object's middle)


class PromptableVolumeModule(PromptedModule):
    """Lightning module: a :class:`PromptableVolume` trained on ``image`` / ``mask`` patches with simulated clicks:
    for each volume one class as a binary object, a first click in it and then up to ``click_rounds`` correction
    clicks, each from the larger error of the model's own prediction with the clicks so far (SAM-Med3D's
    interactive training; :func:`medfm.evaluate.prompts.next_voxel_click`); the loss is Dice + BCE (MONAI's
    ``DiceCELoss``) of the last round's mask."""

    def __init__(self, model: PromptableVolume, classes: list, click_rounds: int = 4, **kwargs):
        super().__init__(model, classes, **kwargs)
        self.click_rounds = click_rounds

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        rng, keep, targets = self.objects(batch)
        if not keep:
            return self.no_object(), {}
        feats = self.model.features(batch["image"][keep])
        device = feats.device
        clicks = []
        for i in range(len(keep)):
            truth = targets[i, 0].cpu().numpy() > 0
            pred, points, labels = np.zeros_like(truth), [], []
            rounds = 1 + int(rng.integers(0, self.click_rounds + 1))
            for r in range(rounds):
                click = next_voxel_click(pred, truth, seed=int(rng.integers(2**31 - 1)))
                if click is None:
                    break
                points.append(list(click[0]))
                labels.append(click[1])
                if r < rounds - 1:
                    with torch.no_grad():
                        low = self.model.decode(feats[i:i + 1].detach(), torch.tensor([points], device=device),
                                                torch.tensor([labels], device=device))
                    pred = low[0, 0].cpu().numpy() > 0
            clicks.append((points, labels))
        n = max(len(p) for p, _ in clicks)
        pts = torch.zeros(len(keep), n, 3, device=device)
        labs = torch.full((len(keep), n), -1, dtype=torch.long, device=device)  # -1: padding, no click
        for i, (p, lab) in enumerate(clicks):
            pts[i, :len(p)] = torch.tensor(p, dtype=torch.float32)
            labs[i, :len(lab)] = torch.tensor(lab)
        logits = torch.cat([self.model.decode(feats[i:i + 1], pts[i:i + 1], labs[i:i + 1]) for i in range(len(keep))])
        loss = self.criterion(logits.float(), targets)
        return loss, {"clicks": torch.tensor(float(np.mean([len(p) for p, _ in clicks])))}


@torch.no_grad()
def evaluate_clicked(model: PromptableVolume, ds, classes: list, class_names: list, out: Path, split: str,
                     clicks: list, max_objects: int | None = None, overlays: int = 6) -> dict:
    """Every object (one class of one volume) of a split, prepared as the run prepares its data and scored after
    each click count (:func:`click_scores`: the first click in the object, each next in the larger error; the model
    reads the training patch around the first click); Dice and NSD (2 voxels) per click count and per class, CPU
    seconds per encoding (one per object) and per click round, and
    ``prompted_<split>.html`` with the slice through each shown object's middle."""
    scores, per_class, shown = [], {}, []
    encode_s = click_s = 0.0
    n_volumes = n_rounds = n_encodings = 0
    records = getattr(ds, "records", None)
    bar = progress_bar(total=len(ds), desc=f"clicks {split}", unit="volume", leave=False)
    for i in range(len(ds)):
        bar.update(1)
        if max_objects is not None and len(scores) >= max_objects:
            break
        sample = ds[i]
        truth_all = sample["mask"][0].numpy()
        present = [c for c in classes if (truth_all == c).any()]
        if not present:
            continue
        n_volumes += 1
        embedded: dict = {}

        def predict(points, labels):  # each object's region is read around its first click, encoded once
            nonlocal click_s, n_rounds, encode_s, n_encodings
            first = tuple(points[0])
            if first not in embedded:
                t = time.process_time()
                embedded.clear()
                embedded[first] = model.embed(sample["image"], centre=first)
                encode_s += time.process_time() - t
                n_encodings += 1
            t = time.process_time()
            mask = model.predict(embedded[first], points, labels)["mask"].numpy()
            click_s += time.process_time() - t
            n_rounds += 1
            return mask

        for c in present:
            truth = truth_all == c
            res = click_scores(predict, truth, clicks=clicks, seed=i)
            name = class_names[classes.index(c)]
            flat = {f"{p}_{m}": v[m] for p, v in res.items() if p != "shown" for m in v}
            scores.append(flat)
            per_class.setdefault(name, []).append(flat)
            if len(shown) < overlays:  # the slice through the object's middle, shown as propagate shows slices
                ks = np.nonzero(truth.any((0, 1)))[0]
                k = int(ks[len(ks) // 2])
                cut = lambda v: np.asarray(v)[:, :, k].T  # noqa: E731
                where = Path(records[i].image).name if records is not None else f"volume {i}"
                shown.append({"image": cut(sample["image"][0].numpy()), "truth": cut(truth), "box": None,
                              "name": f"{where} ({name}, slice {k})", "scores": flat,
                              "first_mask": cut(res["shown"]["first_mask"]), "click_mask": cut(res["shown"]["click_mask"]),
                              "points": [(p[0], p[1]) for p in res["shown"]["points"] if p[2] == k],
                              "labels": [lab for p, lab in zip(res["shown"]["points"], res["shown"]["labels"]) if p[2] == k]})
    bar.close()
    if not scores:
        raise DataError(f"split {split!r}: no mask holds any of the classes {classes}")
    res = object_means(scores, per_class)
    res.update(n=len(scores), n_volumes=n_volumes, cpu_s_per_encoding=encode_s / max(n_encodings, 1),
               cpu_s_per_click_round=click_s / max(n_rounds, 1))
    prompted_page(shown, res, out / f"prompted_{split}.html", title=f"{split}: 3D promptable segmentation (clicks)")
    return res


@TASKS.register
class PromptableVolumeTask(PromptableTask):
    """Native 3D promptable segmentation (``tasks/promptable_3d.yaml``): a 3D encoder, clicks in the volume."""

    name = "promptable_3d"
    Config = PromptableVolumeConfig
    model_class = PromptableVolume
    headline = ("click_1_dice", "click_3_dice", "click_5_dice", "click_10_dice")

    def validate(self, cfg: dict) -> None:
        FinetuneTask.validate(self, cfg)
        s, enc = self.config(cfg), cfg["encoder"]
        if enc["spatial_dims"] != 3:
            raise ValueError("promptable_3d takes a 3D encoder (encoder.spatial_dims: 3); a 2D model segments volumes "
                             "slice by slice: tasks/promptable_2d.yaml")
        if s.feature_dim % 8 or s.click_rounds < 0:
            raise ValueError("promptable_3d: feature_dim a multiple of 8 and click_rounds >= 0")

    def resolve(self, cfg: dict) -> dict:
        return cfg

    def eval_size(self, cfg: dict):
        return None  # the whole volume: its clicks are placed anywhere in it

    def prepare(self, cfg: dict, train, state: dict):
        """The classes and object rows (as in 2D), and one line when the recipe resamples the set far from its
        native spacing (``--profile cpu``'s 3 mm on a 1 mm set)."""
        d = self.section(cfg, "data")
        note = recipe_resampling_note(d.path, d.preset, d.preset_args, d.train_split,
                                      remedy="tasks/promptable_3d.yaml is CPU-sized without a profile")
        if note:
            warnings.warn(note, stacklevel=2)
        return super().prepare(cfg, train, state)

    def head(self, cfg: dict, state: dict) -> dict:
        s = self.config(cfg)
        return {"feature_dim": s.feature_dim, "decoder_width": s.decoder_width, "max_prompt": s.max_prompt,
                "patch": list(ensure_tuple_rep(cfg["encoder"]["img_size"], 3)), "classes": s.classes,
                "class_names": s.class_names}

    def module(self, cfg: dict, model, train, state: dict):
        s = self.config(cfg)
        return PromptableVolumeModule(model, s.classes, s.click_rounds, frozen_encoder=self.frozen_encoder(cfg),
                                      **self.optim(cfg))

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        s = self.config(cfg)
        return evaluate_clicked(model, ds, s.classes, s.class_names, out, split, list(s.eval_clicks), s.eval_max,
                                s.overlays)
