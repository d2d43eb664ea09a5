"""Visual prompt tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022, https://arxiv.org/abs/2203.12119).

Learnable prompt tokens are inserted between the prefix (class) token and the
patch tokens of a frozen ViT. *Shallow* VPT adds them once, before the first
block; *deep* VPT replaces them with a fresh set before every block. No library
implements VPT for a 2D/3D ViT, so it is written here over the medfm ViT's
``patchify_embed`` / ``add_prefix`` / ``blocks`` API; outputs drop the prompt
tokens, so heads and decoders see the same shapes as without prompts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from timm.models._features import feature_take_indices


class PromptedViT(nn.Module):
    """A medfm ViT with ``num_tokens`` learnable prompts (shallow or ``deep``); the same API as the ViT."""

    def __init__(self, vit: nn.Module, num_tokens: int = 10, deep: bool = False):
        super().__init__()
        if not hasattr(vit, "patchify_embed"):
            raise ValueError(f"VPT needs a medfm ViT (patch tokens); got {type(vit).__name__}")
        if num_tokens < 1:
            raise ValueError(f"vpt.num_tokens must be >= 1, got {num_tokens}")
        self.vit = vit
        self.num_tokens, self.deep = num_tokens, deep
        n_sets = len(vit.blocks) if deep else 1
        # the paper's init: uniform with a Xavier bound over (patch volume x 3 + width)
        bound = math.sqrt(6.0 / (3 * math.prod(vit.patch_size) + vit.embed_dim))
        self.prompts = nn.Parameter(torch.empty(n_sets, num_tokens, vit.embed_dim).uniform_(-bound, bound))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("vit"), name)  # spatial_dims, patch_size, embed_dim, ...

    def _insert(self, h: torch.Tensor, i: int, replace: bool) -> torch.Tensor:
        p, n = self.vit.num_prefix_tokens, self.num_tokens
        prompt = self.prompts[i].expand(h.shape[0], -1, -1).to(h.dtype)
        rest = h[:, p + n:] if replace else h[:, p:]
        return torch.cat([h[:, :p], prompt, rest], dim=1)

    def _strip(self, h: torch.Tensor) -> torch.Tensor:
        p, n = self.vit.num_prefix_tokens, self.num_tokens
        return torch.cat([h[:, :p], h[:, p + n:]], dim=1)

    def _run(self, x: torch.Tensor, take: Sequence[int] = (), norm: bool = False):
        tokens, grid = self.vit.patchify_embed(x)
        h = self._insert(self.vit.add_prefix(tokens), 0, replace=False)
        maps = []
        last = max(take) if take else len(self.vit.blocks) - 1
        for i, blk in enumerate(self.vit.blocks[: last + 1]):
            if self.deep and i > 0:
                h = self._insert(h, i, replace=True)
            h = blk(h)
            if i in take:
                f = self._strip(self.vit.norm(h) if norm else h)[:, self.vit.num_prefix_tokens:]
                maps.append(f.transpose(1, 2).reshape(f.shape[0], self.vit.embed_dim, *grid))
        return h, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix + patch tokens after the last block and norm (prompts removed)."""
        h, _ = self._run(x)
        return self.vit.norm(self._strip(h))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return self.vit.forward_head(x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[torch.Tensor]:
        """As :meth:`medfm.encoders.ViT.forward_intermediates`, with the prompts in the sequence."""
        take, _ = feature_take_indices(len(self.vit.blocks), indices)
        return self._run(x, take, norm)[1]
