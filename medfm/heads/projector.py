"""From an encoder's feature map to a language model's input embeddings: the projectors of LLaVA-style models.

* ``linear`` / ``mlp2x_gelu`` / ``mlpNx_gelu``: LLaVA's projector (``linear_1``, GELU, ``linear_2``: the names
  transformers' ``LlavaMultiModalProjector`` uses, so weights move between the two unchanged);
* ``pool``: the token grid average-pooled to a fixed grid first (M3D-LaMed's 3D spatial pooling: a volume's
  thousands of patch tokens become a few hundred; also 2D);
* ``resampler``: a perceiver resampler (RadFM, Flamingo): a fixed number of learned latent queries
  cross-attend to the tokens, so every image or volume gives the same number of tokens whatever its size.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTORS = "linear, mlp2x_gelu (LLaVA-1.5), mlpNx_gelu (N linear layers, GELU between)"


def projector_depth(kind: str) -> int:
    """Number of linear layers of a projector name (``linear`` 1, ``mlp2x_gelu`` 2, ...)."""
    if kind == "linear":
        return 1
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"projector {kind!r}: one of {PROJECTORS}")
    return int(m.group(1))


class PerceiverResampler(nn.Module):
    """``latents`` learned queries that read the tokens through ``depth`` cross-attention + MLP layers (the
    queries attend to the tokens and to themselves, as in Flamingo), then a LayerNorm: (B, N, C) -> (B, latents, C)."""

    def __init__(self, dim: int, latents: int = 32, depth: int = 2, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"resampler heads ({heads}) must divide the encoder width ({dim})")
        self.latents = nn.Parameter(torch.randn(latents, dim) * dim**-0.5)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"norm_media": nn.LayerNorm(dim), "norm_latents": nn.LayerNorm(dim),
                           "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                           "mlp": nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))})
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            q = layer["norm_latents"](x)
            kv = torch.cat([layer["norm_media"](tokens), q], dim=1)
            x = x + layer["attn"](q, kv, kv, need_weights=False)[0]
            x = x + layer["mlp"](x)
        return self.norm(x)


class MultimodalProjector(nn.Module):
    """An encoder feature map (B, C, *grid) -> tokens in the LM's embedding space (B, T, out_dim).

    Args:
        in_dim / out_dim: the encoder's width and the LM's hidden size.
        kind: the MLP (see :data:`PROJECTORS`).
        pool: a grid the feature map is average-pooled to first (one entry per spatial dim), or None.
        resampler: ``{"latents", "depth", "heads"}`` of a :class:`PerceiverResampler`, or None.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp2x_gelu", pool: Sequence[int] | None = None,
                 resampler: dict | None = None):
        super().__init__()
        depth = projector_depth(kind)
        self.pool = tuple(pool) if pool else None
        self.resampler = PerceiverResampler(in_dim, **resampler) if resampler else None
        dims = [in_dim] + [out_dim] * depth
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.depth = depth
        self.act = nn.GELU()

    def num_tokens(self, grid: Sequence[int]) -> int:
        """Tokens per image for an encoder token grid."""
        if self.resampler is not None:
            return self.resampler.latents.shape[0]
        return math.prod(self.pool) if self.pool else math.prod(grid)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.pool:
            if len(self.pool) != feature_map.ndim - 2:
                raise ValueError(f"projector pool {list(self.pool)} has {len(self.pool)} entries for a "
                                 f"{feature_map.ndim - 2}D feature map")
            pool = F.adaptive_avg_pool2d if feature_map.ndim == 4 else F.adaptive_avg_pool3d
            feature_map = pool(feature_map, self.pool)
        x = feature_map.flatten(2).transpose(1, 2)
        if self.resampler is not None:
            x = self.resampler(x)
        for i in range(self.depth):
            if i:
                x = self.act(x)
            x = getattr(self, f"linear_{i + 1}")(x)
        return x
