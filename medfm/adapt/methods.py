"""Adaptation methods: which encoder parameters a fine-tuning run trains, and how the result is exported.

One switch (``method`` in a task recipe):

* ``linear_probe``: encoder frozen; only the head trains (classification caches the features once);
* ``full``: everything trains, with layer-wise learning-rate decay (``full.layer_decay``);
* ``lora``: peft's LoRA on the layers the encoder declares (``lora_targets``; a ViT's attention ``qkv``, ``proj``
  and MLP ``fc1``, ``fc2`` projections), or on ``lora.target_modules``;
* ``vpt``: learnable prompt tokens, shallow or deep (:mod:`.vpt`);
* ``ssf``: per-channel scale and shift after every layer (:mod:`.ssf`);
* ``bitfit``: biases only (Ben Zaken et al., 2022).

The head (or segmentation decoder) always trains. :func:`export_encoder`
turns an adapted encoder back into a plain one (LoRA and SSF merged into the
weights) for ``save_pretrained``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model

from medfm.run.recipe import config_from_signature

from .ssf import add_ssf, merge_ssf
from .vpt import PromptedViT

METHODS = ("linear_probe", "full", "lora", "vpt", "ssf", "bitfit")


@dataclass
class FullConfig:
    """``full`` recipe section."""

    layer_decay: float = 0.75  # layer-wise learning-rate decay (BEiT / MAE fine-tuning); 1: off


@dataclass
class LoRAConfig:
    """``lora`` recipe section (peft's LoRA)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list | None = None  # regex or layer names (null: the encoder's lora_targets; ViT: qkv/proj/fc1/fc2)


VPTConfig = config_from_signature(PromptedViT, "VPTConfig", exclude=("self", "vit"))  # ``vpt`` recipe section


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


METHOD_SECTIONS = {"full": FullConfig, "lora": LoRAConfig, "vpt": VPTConfig}  # methods with a recipe section


def adapt_encoder(encoder: nn.Module, method: str, **sections: dict | None) -> nn.Module:
    """The encoder prepared for ``method``: its trainable parameters set, adapter modules added
    (``lora={...}`` / ``vpt={...}``: that method's section, defaults from :class:`LoRAConfig` /
    :class:`VPTConfig`; sections of other methods are ignored)."""
    lora, vpt = sections.get("lora"), sections.get("vpt")
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; available: {', '.join(METHODS)}")
    if method == "full":
        return encoder
    _freeze(encoder)
    if method == "linear_probe":
        return encoder.eval()
    if method == "bitfit":
        for name, p in encoder.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
        return encoder
    if method == "ssf":
        return add_ssf(encoder)
    if method == "vpt":
        return PromptedViT(encoder, **asdict(VPTConfig(**(vpt or {}))))
    args = asdict(LoRAConfig(**(lora or {})))
    targets = args["target_modules"] or getattr(encoder, "lora_targets", None)
    if targets is None or isinstance(targets, str) and not any(_full_match(targets, n) for n, _ in encoder.named_modules()):
        raise ValueError(f"LoRA: no layer of {type(encoder).__name__} matches target_modules {targets!r} "
                         "(set lora.target_modules to layer names, e.g. for a CNN ['conv1', 'conv2'])")
    config = LoraConfig(r=args["r"], lora_alpha=args["alpha"], lora_dropout=args["dropout"], target_modules=targets)
    return get_peft_model(encoder, config)


def _full_match(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None


def is_lora(encoder: nn.Module) -> bool:
    return isinstance(encoder, PeftModel)


def export_encoder(encoder: nn.Module) -> nn.Module:
    """A plain medfm encoder with the adaptation folded in (a copy): LoRA merged (``merge_and_unload``),
    SSF merged, VPT's base ViT (prompts live in the task model, not in a plain encoder)."""
    enc = copy.deepcopy(encoder)
    if is_lora(enc):
        enc = enc.merge_and_unload()
    if isinstance(enc, PromptedViT):
        enc = enc.vit
    if hasattr(enc, "ssf"):
        enc = merge_ssf(enc)
    for p in enc.parameters():
        p.requires_grad_(True)
    return enc


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
