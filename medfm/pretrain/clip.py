"""CLIP-style image/volume-text contrastive pretraining.

Any medfm encoder (2D or 3D, ViT or ResNet) and a Hugging Face text encoder
(:class:`medfm.encoders.text.TextEncoder`, the packaged MiniLM by default) are
projected linearly into one embedding space; matching image-text pairs of a batch
are pulled together, the others pushed apart. The losses are open_clip's:

* ``clip``: ``open_clip.ClipLoss`` (softmax InfoNCE in both directions, learnable
  temperature). Under DDP every rank gathers the other ranks' embeddings *with
  gradients* (``gather_with_grad``) and scores its own rows against all
  (``local_loss``), so the loss equals the single-process loss of the global batch.
* ``siglip``: ``open_clip.SigLipLoss`` (pairwise sigmoid, learnable temperature and bias).

Either tower can be locked (LiT: a pretrained image tower frozen, the text tower
trained), or all but its last ``unlocked_layers`` blocks frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from open_clip.loss import ClipLoss, SigLipLoss

from medfm.encoders import CLIP, TextEncoder
from medfm.evaluate.zeroshot import TEMPLATES, evaluate_zero_shot, load_clip_run
from medfm.run import TrainingModule
from medfm.run.recipe import split_kwargs

from .method import PretrainMethod
from .registry import register_method
from .views import mae_view


def _blocks(tower: nn.Module) -> list[nn.Module]:
    """The sequential blocks of a tower (the encoder interface's ``encoder_blocks``), for partial unlocking."""
    try:
        return tower.encoder_blocks()
    except (AttributeError, NotImplementedError):
        raise ValueError(f"{type(tower).__name__}: cannot find its blocks to unlock the last ones "
                         "(set unlocked_layers: 0 to lock the whole tower)") from None


def lock_tower(tower: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze ``tower`` except its last ``unlocked_layers`` blocks (and the final norm after them)."""
    tower.requires_grad_(False)
    if unlocked_layers > 0:
        for block in _blocks(tower)[-unlocked_layers:]:
            block.requires_grad_(True)
        for name in ("norm", "fc_norm"):
            if isinstance(getattr(tower, name, None), nn.Module):
                getattr(tower, name).requires_grad_(True)


def make_loss(name: str, rank: int = 0, world_size: int = 1) -> nn.Module:
    """open_clip's loss for ``name``, set up for this rank of ``world_size`` (gather with gradients)."""
    if name == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=False, rank=rank, world_size=world_size)
    return SigLipLoss(rank=rank, world_size=world_size)


def clip_loss(model: CLIP, image_features: torch.Tensor, text_features: torch.Tensor, criterion: nn.Module):
    """The loss of normalised features under the model's (clamped) temperature."""
    scale = model.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP clamps the scale at 100
    if model.logit_bias is None:
        return criterion(image_features, text_features, scale)
    return criterion(image_features, text_features, scale, model.logit_bias)


@dataclass
class CLIPConfig:
    """``clip`` recipe section."""

    init: str | None = None  # a CLIP run or converted folder (`medfm models convert` BiomedCLIP): start from its
    # text tower, projections and temperature (text_model, pooling, embed_dim, loss come from it); the image
    # tower is the recipe's encoder (encoder.pretrained=FOLDER/encoder for its image tower)
    text_model: str | None = None  # Hugging Face id or folder (null: the packaged MiniLM)
    max_length: int = 128  # text tokens
    pooling: str = "mean"  # mean | cls
    embed_dim: int = 256  # shared embedding width
    loss: str = "clip"  # clip | siglip
    init_temperature: float = 0.07
    lock_image: bool | str = "auto"  # LiT: freeze the image tower (auto: when encoder.pretrained names weights)
    lock_text: bool = False
    unlocked_layers: int = 0  # blocks left trainable at the end of a locked tower
    feature_norm: bool | str = "auto"  # standardise a tower's features before its projection (auto: locked towers)


class CLIPModule(TrainingModule):
    """Lightning module for paired ``image`` + ``text`` batches (text = list of strings); keyword
    arguments are :class:`CLIPConfig`'s and the optimizer's."""

    def __init__(self, encoder: nn.Module, **kwargs):
        c, optim = split_kwargs(CLIPConfig, kwargs)
        super().__init__(**optim)
        lock_image = c.lock_image is True  # "auto" is decided by the recipe (CLIPMethod.module_args)
        if c.init:
            self.model = load_clip_run(c.init)
            self.model.image_encoder = encoder
            text = self.model.text_encoder
        else:
            text = TextEncoder(c.text_model, max_length=c.max_length, pooling=c.pooling)
            norm = {"image_norm": lock_image, "text_norm": c.lock_text} if c.feature_norm == "auto" else \
                {"image_norm": bool(c.feature_norm), "text_norm": bool(c.feature_norm)}
            self.model = CLIP(encoder, text, embed_dim=c.embed_dim, init_temperature=c.init_temperature, loss=c.loss,
                              **norm)
        if lock_image:
            lock_tower(encoder, c.unlocked_layers)
        if c.lock_text:
            lock_tower(text, c.unlocked_layers)
        self.locked = {"image": lock_image, "text": c.lock_text}
        self.train()  # from_pretrained leaves the text tower in eval mode; locked towers stay in eval
        self.criterion = make_loss(self.model.loss_name)

    @property
    def encoder(self) -> nn.Module:
        return self.model.image_encoder

    def setup(self, stage: str) -> None:
        # the loss must know this rank's place to gather embeddings across ranks
        self.criterion = make_loss(self.model.loss_name, self.global_rank, self.trainer.world_size)

    def train(self, mode: bool = True):
        super().train(mode)
        for name, tower in (("image", self.model.image_encoder), ("text", self.model.text_encoder)):
            if mode and self.locked[name] and not any(p.requires_grad for p in tower.parameters()):
                tower.eval()  # a fully locked tower keeps its normalisation statistics and no dropout
        return self

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if "text" not in batch:
            raise ValueError("CLIP pretraining needs report/caption text: set data.text to the manifest's text column")
        img, txt = self.model(batch["image"], list(batch["text"]))
        loss = clip_loss(self.model, img.float(), txt.float(), self.criterion)
        return loss, {"logit_scale": self.model.logit_scale.exp().detach()}


@register_method
class CLIPMethod(PretrainMethod):
    """``method: clip``: image-text pairs (``data.text``); views are mild random-resized crops. Exports
    ``encoder/`` (image tower), ``text/`` (text tower, also a Hugging Face folder) and ``model/`` (the
    whole CLIP model; ``medfm.load(RUN)``). ``medfm evaluate RUN`` runs zero-shot classification and
    retrieval."""

    name = "clip"
    evaluate_options = ("data", "split", "classes", "text", "templates", "out")  # zero-shot and retrieval
    Config = CLIPConfig
    module_class = CLIPModule
    needs = "text"
    model_folder = "model"

    def module_args(self, cfg: dict) -> dict:
        """``lock_image: auto`` is LiT when the image tower starts from pretrained weights (a self-supervised
        encoder: a randomly initialised ViT tower trained from image-text pairs alone stays at the uniform
        solution for a long time), and a trained tower from random init."""
        args = super().module_args(cfg)
        if args["lock_image"] == "auto":
            args["lock_image"] = bool(cfg["encoder"].get("pretrained"))
        elif not isinstance(args["lock_image"], bool):
            raise ValueError(f"clip.lock_image must be true, false or auto, got {args['lock_image']!r}")
        return args

    def make_view(self, cfg: dict):
        enc = cfg["encoder"]
        kw = {"scale": (0.8, 1.0), **cfg["view"]}
        return mae_view(enc["spatial_dims"], enc["img_size"], scale=tuple(kw.pop("scale")), **kw)

    def export(self, module, folder, trainer, built) -> None:
        super().export(module, folder, trainer, built)
        folder.save(module.model.text_encoder, "text")
        folder.save(module.model, "model")

    def evaluate(self, run: Path, data: str | None = None, split: str = "val", classes: Sequence[str] = (),
                 text: str | None = None, templates: Sequence[str] | None = None, out: str | None = None) -> dict:
        if not data:
            raise ValueError("evaluating a CLIP run needs a manifest: give --data and --classes COLUMNS "
                             "and/or --text COLUMN")
        return evaluate_zero_shot(run, data, classes, split=split, text_key=text, templates=templates or TEMPLATES,
                                  out=out)

    def summary(self, m: dict) -> list[str]:
        """Zero-shot accuracy per label column against the majority rate; retrieval recall against chance."""
        lines = [f"{m['n']} images of {m['data']} (split {m['split']})"]
        for col, v in m.items():
            if isinstance(v, dict) and "majority_rate" in v:
                lines.append(f"  {col:<20} zero-shot accuracy {v['accuracy']:.4f}  balanced {v['balanced_accuracy']:.4f}  "
                             f"majority-class rate {v['majority_rate']:.4f}  ({len(v['classes'])} classes)")
        r = m.get("retrieval")
        for way in ("image_to_text", "text_to_image") if r else ():
            lines.append(f"  {way:<20} " + "  ".join(f"{k} {r[way][k]:.3f} (chance {r['chance'][k]:.3f})" for k in r["chance"]))
        return lines
