"""The CLIP model: an image (or volume) encoder and a text encoder projected into one embedding space.

Training (losses, locking, the Lightning module) lives in :mod:`medfm.pretrain.clip`; this is the model
that training produces and zero-shot evaluation consumes. Saved as one artifact folder
(:mod:`medfm.artifacts`): ``config.json`` + ``model.safetensors`` (projections, temperature, bias) and
the two towers in ``image_encoder/`` and ``text_encoder/``, each a folder that reloads alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfm.artifacts import Artifact

LOSSES = ("clip", "siglip")


class CLIP(nn.Module, Artifact):
    """Image encoder + text encoder + linear projections + learnable logit scale (and bias for SigLIP).

    ``image_norm`` / ``text_norm``: standardise that tower's pooled features per channel (BatchNorm without
    affine parameters, as MAE's linear probe does) before its projection. Meant for a locked tower (LiT):
    its frozen features share a large common component (pairwise cosine ~0.96 between images for a small
    self-supervised ViT), so every projected embedding points the same way and the contrastive loss sits
    at log B until the projection has learned to remove it. ``text_proj_hidden``: an MLP text projection of
    that width instead of a linear one (open_clip's ``hf_proj_type: mlp``, BiomedCLIP's)."""

    components = ("image_encoder", "text_encoder")

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 256,
                 init_temperature: float = 0.07, loss: str = "clip", init_bias: float = -10.0,
                 image_norm: bool = False, text_norm: bool = False, text_proj_hidden: int | None = None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_proj = nn.Linear(image_encoder.embed_dim, embed_dim, bias=False)
        if text_proj_hidden:  # open_clip's hf_proj_type "mlp" (BiomedCLIP): Linear, GELU, Linear, no biases
            self.text_proj = nn.Sequential(nn.Linear(text_encoder.embed_dim, text_proj_hidden, bias=False), nn.GELU(),
                                           nn.Linear(text_proj_hidden, embed_dim, bias=False))
        else:
            self.text_proj = nn.Linear(text_encoder.embed_dim, embed_dim, bias=False)
        for proj in (self.image_proj, *[m for m in self.text_proj.modules() if isinstance(m, nn.Linear)]):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)  # open_clip's projection init: N(0, width^-1/2)
        self.image_norm = nn.BatchNorm1d(image_encoder.embed_dim, affine=False) if image_norm else nn.Identity()
        self.text_norm = nn.BatchNorm1d(text_encoder.embed_dim, affine=False) if text_norm else nn.Identity()
        self.norms = {"image_norm": image_norm, "text_norm": text_norm}
        # SigLIP's paper initialises t' = log 10 and b = -10; CLIP's 1/0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if loss == "siglip" else 1 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(init_bias)) if loss == "siglip" else None
        self.loss_name, self.embed_dim = loss, embed_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image (or volume) embeddings (B, embed_dim)."""
        return F.normalize(self.image_proj(self.image_norm(self.image_encoder(images))), dim=-1)

    def encode_text(self, texts=None, input_ids=None, attention_mask=None) -> torch.Tensor:
        """L2-normalised text embeddings (B, embed_dim) of raw strings or token ids."""
        pooled = self.text_encoder(texts, input_ids=input_ids, attention_mask=attention_mask)["pooled"]
        return F.normalize(self.text_proj(self.text_norm(pooled)), dim=-1)

    def forward(self, images: torch.Tensor, texts) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(texts)
