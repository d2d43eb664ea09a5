"""Masked autoencoder (MAE) pretraining for 2D images and 3D volumes.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
(https://arxiv.org/abs/2111.06377). A random ``mask_ratio`` of the patches is
dropped, the encoder sees only the visible ones, a light transformer decoder
(timm blocks) fills in mask tokens and predicts the pixels of every patch, and
the loss is the mean squared error on the masked patches only, against
per-patch normalised pixels (``norm_pix_loss``).

The same code runs 2D and 3D: patches are the encoder's ``patch_size`` boxes
(cubes, or anisotropic boxes such as 4x16x16 for thick-slice CT).

Missing-modality masking (``modality_dropout``) is for multi-channel inputs
such as multi-sequence brain MRI (T1, T2, FLAIR, ...), as in multimodal MAE
pretraining: with that probability a sample loses one whole channel from the
encoder's input, and the loss also covers every patch of the dropped channel,
so the model learns to synthesise a missing sequence from the others.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from lightly.models.utils import random_token_mask
from monai.networks.blocks.patchembedding import build_sincos_position_embedding
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from medfm.encoders.vit import resample_grid_embed
from medfm.evaluate.plots import reconstruction_png
from medfm.run import TrainingModule
from medfm.run.recipe import config_from_signature, split_kwargs

from .method import PretrainMethod
from .registry import register_method


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, C, prod(patch)) in the token order of the ViT's patch embedding."""
    b, c, *spatial = x.shape
    n = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch_size)]
    shape = [b, c]
    for g, p in zip(grid, patch_size):
        shape += [g, p]
    x = x.reshape(shape)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., C, p0, p1, ...)
    perm = [0] + [2 + 2 * i for i in range(n)] + [1] + [3 + 2 * i for i in range(n)]
    return x.permute(perm).reshape(b, math.prod(grid), c, math.prod(patch_size))


def unpatchify(patches: torch.Tensor, patch_size: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, C, prod(patch)) -> (B, C, *spatial)."""
    b, _, c, _ = patches.shape
    n = len(grid)
    x = patches.reshape(b, *grid, c, *patch_size)
    # (B, g0.., C, p0..) -> (B, C, g0, p0, g1, p1, ...)
    perm = [0, 1 + n]
    for i in range(n):
        perm += [1 + i, 2 + n + i]
    return x.permute(perm).reshape(b, c, *[g * p for g, p in zip(grid, patch_size)])


class MaskedAutoencoder(nn.Module):
    """An encoder (medfm ViT, 2D or 3D) plus MAE's masking, decoder and loss.

    ``forward(x)`` returns ``loss``, ``pred`` (B, N, C, P) pixel predictions of every
    patch, ``mask`` (B, N) with 1 on masked patches, ``dropped`` (B, C) with 1 on
    channels removed by missing-modality masking, and ``target`` (B, N, C, P).
    """

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        norm_pix_loss: bool = True,
        modality_dropout: float = 0.0,
    ):
        super().__init__()
        if not hasattr(encoder, "patchify_embed"):
            raise TypeError(f"MAE needs a token encoder with patchify_embed (a medfm ViT), got {type(encoder).__name__}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {modality_dropout}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.modality_dropout = modality_dropout
        self.patch_size = tuple(encoder.patch_size)
        dims = encoder.spatial_dims
        patch_pixels = encoder.in_chans * math.prod(self.patch_size)

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, math.prod(encoder.grid_size), decoder_dim))
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
              for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_pixels)

        # fixed sin-cos decoder positions as in MAE when the width allows it, learned otherwise
        if decoder_dim % (2 * dims) == 0:
            pos = build_sincos_position_embedding(list(encoder.grid_size), decoder_dim, dims)
            self.decoder_pos_embed.data.copy_(pos.data)
            self.decoder_pos_embed.requires_grad_(False)
        else:
            trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ parts
    def drop_modalities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero one random channel of a random subset (prob ``modality_dropout``) of the samples."""
        b, c = x.shape[:2]
        dropped = torch.zeros(b, c, dtype=torch.bool, device=x.device)
        if self.modality_dropout > 0 and c > 1:
            hit = torch.rand(b, device=x.device) < self.modality_dropout
            which = torch.randint(0, c, (b,), device=x.device)
            dropped[hit, which[hit]] = True
            x = x * (~dropped).to(x.dtype).view(b, c, *([1] * (x.ndim - 2)))
        return x, dropped

    def encode_visible(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Encoder on the visible patches: (tokens incl. prefix, idx_keep, idx_mask, grid)."""
        tokens, grid = self.encoder.patchify_embed(x)
        b, n, d = tokens.shape
        idx_keep, idx_mask = random_token_mask((b, n), self.mask_ratio, mask_class_token=True, device=x.device)
        visible = torch.gather(tokens, 1, idx_keep[..., None].expand(-1, -1, d))
        h = self.encoder.run_blocks(self.encoder.add_prefix(visible))
        return self.encoder.norm(h), idx_keep, idx_mask, grid

    def decode(self, h: torch.Tensor, idx_keep: torch.Tensor, n: int, grid: Sequence[int]) -> torch.Tensor:
        """Decoder: visible tokens back in place, mask tokens elsewhere -> (B, N, C*P) pixels."""
        prefix = self.encoder.num_prefix_tokens
        h = self.decoder_embed(h)
        b, _, d = h.shape
        full = self.mask_token.to(h.dtype).expand(b, n, d).clone()
        full.scatter_(1, idx_keep[..., None].expand(-1, -1, d), h[:, prefix:])
        full = full + resample_grid_embed(self.decoder_pos_embed, self.encoder.grid_size, grid).to(h.dtype)
        out = self.decoder_blocks(torch.cat([h[:, :prefix], full], dim=1))
        return self.decoder_pred(self.decoder_norm(out))[:, prefix:]

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels per patch and channel (B, N, C, P), normalised per patch and channel if ``norm_pix_loss``."""
        t = patchify(x, self.patch_size)
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def forward(self, x: torch.Tensor) -> dict:
        x_in, dropped = self.drop_modalities(x)
        h, idx_keep, idx_mask, grid = self.encode_visible(x_in)
        n = idx_keep.shape[1] + idx_mask.shape[1]
        pred = self.decode(h, idx_keep, n, grid).float()
        target = self.target(x.float())
        pred = pred.view_as(target)
        mask = torch.zeros(x.shape[0], n, device=x.device)
        mask.scatter_(1, idx_mask, 1.0)
        # loss on masked patches of every channel, plus every patch of a dropped channel
        weight = torch.maximum(mask[:, :, None], dropped[:, None, :].float())
        err = (pred - target).pow(2).mean(dim=-1)
        loss = (err * weight).sum() / weight.sum().clamp_min(1.0)
        return {"loss": loss, "pred": pred, "target": target, "mask": mask, "dropped": dropped, "grid": grid}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> dict:
        """Images for a figure: ``masked`` input, ``reconstruction`` (visible patches pasted back) and ``target``.

        With ``norm_pix_loss`` the predicted patches are de-normalised with the
        true patch statistics, as MAE's visualisation does.
        """
        out = self.forward(x)
        raw = patchify(x.float(), self.patch_size)
        pred = out["pred"]
        if self.norm_pix_loss:
            pred = pred * (raw.var(dim=-1, keepdim=True) + 1e-6).sqrt() + raw.mean(dim=-1, keepdim=True)
        m = out["mask"][:, :, None, None]
        grid = out["grid"]
        return {
            "masked": unpatchify(raw * (1 - m), self.patch_size, grid),
            "reconstruction": unpatchify(raw * (1 - m) + pred * m, self.patch_size, grid),
            "target": x.float(),
            "loss": out["loss"],
        }


MAEConfig = config_from_signature(MaskedAutoencoder, "MAEConfig", exclude=("self", "encoder"))


class MAEModule(TrainingModule):
    """Lightning wrapper of :class:`MaskedAutoencoder` (batches hold ``image``); keyword arguments are
    :class:`MaskedAutoencoder`'s (the ``mae`` recipe section) and the optimizer's."""

    def __init__(self, encoder: nn.Module, **kwargs):
        config, optim = split_kwargs(MAEConfig, kwargs)
        super().__init__(**optim)
        self.model = MaskedAutoencoder(encoder, **dataclasses.asdict(config))

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        return super().no_weight_decay_params() + [self.model.mask_token, self.model.decoder_pos_embed]

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        out = self.model(batch["image"])
        return out["loss"], {"masked_fraction": out["mask"].mean()}


def save_mae_figure(model: MaskedAutoencoder, images: torch.Tensor, path: str | Path) -> Path:
    """PNG with one row per sample: masked input, reconstruction, target (mid-slice for volumes)."""
    was_training = model.training
    model.eval()
    try:
        out = model.reconstruct(images)
    finally:
        model.train(was_training)
    panels = {k: out[k] for k in ("masked", "reconstruction", "target")}
    return reconstruction_png(panels, path, title=f"MAE, mask ratio {model.mask_ratio:.2f}, loss {float(out['loss']):.3f}")


@register_method
class MAE(PretrainMethod):
    """``method: mae``: views are random-resized crops; exports the encoder and ``mae_reconstruction.png``
    (the first four views of the run)."""

    name = "mae"
    Config = MAEConfig
    module_class = MAEModule
    figure_samples = 4

    def export(self, module, folder, trainer, built) -> None:
        super().export(module, folder, trainer, built)
        views = built.data.fixed_samples(self.figure_samples)
        device = next(module.parameters()).device
        save_mae_figure(module.model, views.to(device), folder / "mae_reconstruction.png")
