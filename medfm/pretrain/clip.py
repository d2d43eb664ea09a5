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
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import PretrainModule

LOSSES = ("clip", "siglip")


def _blocks(tower: nn.Module) -> list[nn.Module]:
    """The sequential blocks of an encoder, for partial unlocking: ViT ``blocks``, BERT ``encoder.layer``,
    ResNet stages."""
    for path in ("blocks", "model.encoder.layer", "encoder.layer", "stages"):
        obj = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"{type(tower).__name__}: cannot find its blocks to unlock the last ones "
                     "(set unlocked_layers: 0 to lock the whole tower)")


def lock_tower(tower: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze ``tower`` except its last ``unlocked_layers`` blocks (and the final norm after them)."""
    tower.requires_grad_(False)
    if unlocked_layers > 0:
        for block in _blocks(tower)[-unlocked_layers:]:
            block.requires_grad_(True)
        for name in ("norm", "fc_norm"):
            if isinstance(getattr(tower, name, None), nn.Module):
                getattr(tower, name).requires_grad_(True)


class CLIP(nn.Module):
    """Image encoder + text encoder + linear projections + learnable logit scale (and bias for SigLIP)."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 256,
                 init_temperature: float = 0.07, loss: str = "clip", init_bias: float = -10.0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_proj = nn.Linear(image_encoder.embed_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_encoder.embed_dim, embed_dim, bias=False)
        # SigLIP's paper initialises t' = log 10 and b = -10; CLIP's 1/0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if loss == "siglip" else 1 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(init_bias)) if loss == "siglip" else None
        self.loss_name = loss

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image (or volume) embeddings (B, embed_dim)."""
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_text(self, texts=None, input_ids=None, attention_mask=None) -> torch.Tensor:
        """L2-normalised text embeddings (B, embed_dim) of raw strings or token ids."""
        pooled = self.text_encoder(texts, input_ids=input_ids, attention_mask=attention_mask)["pooled"]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, images: torch.Tensor, texts) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(texts)

    def heads_state(self) -> dict[str, torch.Tensor]:
        """Everything but the two towers (projections, scale, bias): what zero-shot needs besides them."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("image_encoder.", "text_encoder."))}


def make_loss(name: str, rank: int = 0, world_size: int = 1) -> nn.Module:
    """open_clip's loss for ``name``, set up for this rank of ``world_size`` (gather with gradients)."""
    from open_clip.loss import ClipLoss, SigLipLoss

    if name == "clip":
        return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=False, rank=rank, world_size=world_size)
    return SigLipLoss(rank=rank, world_size=world_size)


def clip_loss(model: CLIP, image_features: torch.Tensor, text_features: torch.Tensor, criterion: nn.Module):
    """The loss of normalised features under the model's (clamped) temperature."""
    scale = model.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP clamps the scale at 100
    if model.logit_bias is None:
        return criterion(image_features, text_features, scale)
    return criterion(image_features, text_features, scale, model.logit_bias)


class CLIPModule(PretrainModule):
    """Lightning module for paired ``image`` + ``text`` batches (text = list of strings)."""

    needs_text = True

    def __init__(self, encoder: nn.Module, text_model: str | None = None, max_length: int = 128,
                 pooling: str = "mean", embed_dim: int = 256, loss: str = "clip", init_temperature: float = 0.07,
                 lock_image: bool = False, lock_text: bool = False, unlocked_layers: int = 0, **optim):
        from medfm.encoders.text import TextEncoder

        super().__init__(**optim)
        text = TextEncoder(text_model, max_length=max_length, pooling=pooling)
        self.model = CLIP(encoder, text, embed_dim=embed_dim, init_temperature=init_temperature, loss=loss)
        if lock_image:
            lock_tower(encoder, unlocked_layers)
        if lock_text:
            lock_tower(text, unlocked_layers)
        self.locked = {"image": lock_image, "text": lock_text}
        self.train()  # from_pretrained leaves the text tower in eval mode; locked towers stay in eval
        self.criterion = make_loss(loss)

    @property
    def encoder(self) -> nn.Module:
        return self.model.image_encoder

    @staticmethod
    def make_view(spatial_dims: int, size, scale=(0.8, 1.0), flip: bool = False):
        from .views import mae_view

        return mae_view(spatial_dims, size, scale=tuple(scale), flip=flip)

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

    def export(self, out: Path) -> None:
        """Besides ``encoder/`` (the image tower): ``text/`` (the text tower, Hugging Face format) and
        ``clip_heads.safetensors`` (projections, scale, bias), written atomically."""
        from safetensors.torch import save_file

        from medfm.atomic import atomic_path

        from .callbacks import save_encoder_atomically

        save_encoder_atomically(self.model.text_encoder, out / "text")
        with atomic_path(out / "clip_heads.safetensors") as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.model.heads_state().items()},
                      str(tmp))
