"""What every medfm encoder offers, declared once: the :class:`Encoder` protocol and :class:`EncoderBase`.

The rest of medfm (pretraining methods, task heads, adaptation methods, the weight reader, the recipe
checker) talks to an encoder through this interface only, never through its class name, so a new encoder
family is one file (a class deriving from :class:`EncoderBase`) plus one ``@register_encoder`` builder.
``tests/test_encoders.py`` checks the protocol for every registered encoder, and
``tests/test_extension.py`` adds a family from a test module and runs it through pretraining, LoRA
fine-tuning, segmentation and reload.
"""

from __future__ import annotations

import re
from typing import ClassVar, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn

from medfm.artifacts import Artifact

FEATURE_MAPS = ("tokens", "pyramid")


@runtime_checkable
class Encoder(Protocol):
    """An image (2D) or volume (3D) encoder, after timm's uniform model API.

    * ``architecture``: the registered name it was built by (saved in its ``config.json``, as timm stores
      ``architecture``), ``None`` for a class built directly;
    * ``spatial_dims``, ``in_chans``; ``embed_dim``: the pooled embedding's width; ``patch_size``: the total
      stride of its last feature map (a ViT's patch, 32 for a ResNet), so :meth:`token_grid` is the grid
      of that map;
    * ``feature_maps``: ``"tokens"`` (every block gives one map at the patch stride: the UNETR decoder picks
      blocks) or ``"pyramid"`` (maps at strides 2, 4, ... ``patch_size``: the U-Net decoder uses them all);
    * ``lora_targets``: what peft's LoRA adapts by default (a regex or layer names; None: no default);
    * ``preprocess``: the preset and arguments its inputs were prepared with (set by the run that trained it);
    * ``forward`` (B, embed_dim), ``forward_features``, ``forward_intermediates`` (feature maps),
      ``encoder_blocks`` (its sequential blocks, for partial unlocking), ``group_matcher`` (layer-wise LR
      decay), ``set_grad_checkpointing``, ``no_weight_decay``;
    * ``checkpoint_filter_fn``: how a foreign checkpoint of its family is converted (timm's idea), called by
      :func:`medfm.encoders.weights.adapt_state_dict` before the generic adaptations.
    """

    architecture: str | None
    spatial_dims: int
    in_chans: int
    embed_dim: int
    patch_size: tuple[int, ...]
    feature_maps: str
    lora_targets: str | list[str] | None
    preprocess: dict | None

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[torch.Tensor]: ...

    def encoder_blocks(self) -> list[nn.Module]: ...

    def token_grid(self, size: Sequence[int]) -> tuple[int, ...]: ...

    def group_matcher(self, coarse: bool = False) -> dict: ...

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...

    def no_weight_decay(self) -> set[str]: ...

    def checkpoint_filter_fn(self, state_dict: dict[str, torch.Tensor], config: dict | None = None,
                             source_dims: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]: ...


class EncoderBase(nn.Module, Artifact):
    """Base of every encoder family: defaults of the :class:`Encoder` protocol and the artifact convention
    (config.json with the constructor arguments, ``architecture`` and ``preprocess``; model.safetensors)."""

    saved_attributes = ("architecture", "preprocess")
    architecture: str | None = None
    preprocess: dict | None = None
    feature_maps: ClassVar[str] = "pyramid"
    dims: ClassVar[tuple[int, ...]] = (2, 3)  # the spatial dims the family builds (SAM's encoder: 2D only)
    lora_targets: ClassVar[str | list[str] | None] = None  # None: the recipe must name them
    input_conv: ClassVar[str | None] = None  # the state-dict key of the first convolution (channels adapt)
    adopt_keys: ClassVar[tuple[str, ...]] = ()  # saved arguments a recipe adopts with the architecture
    grad_checkpointing: bool = False

    def encoder_blocks(self) -> list[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not list its blocks")

    def token_grid(self, size: Sequence[int]) -> tuple[int, ...]:
        """The grid of the last feature map for an input of ``size`` (spatial)."""
        return tuple(int(s) // p for s, p in zip(size, self.patch_size))  # type: ignore[attr-defined]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Pool a feature map (B, C, *grid) to (B, C)."""
        return x.flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, embed_dim)."""
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """One group per block (by the blocks' parameter names); everything else in the stem."""
        names = {id(m): n for n, m in self.named_modules()}
        blocks = [re.escape(names[id(b)]) for b in self.encoder_blocks()]
        return dict(stem=r"^(?!(?:" + "|".join(blocks) + r")\.)", blocks=[(rf"^{b}\.", (i,)) for i, b in enumerate(blocks)])

    def checkpoint_filter_fn(self, state_dict: dict[str, torch.Tensor], config: dict | None = None,
                             source_dims: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Convert a checkpoint of this family to this model's keys and shapes: nothing by default."""
        return state_dict, []
