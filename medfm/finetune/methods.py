"""Adaptation methods: which encoder parameters a fine-tuning run trains, and how the result is exported.

One switch (``method`` in a task recipe):

* ``linear_probe``: encoder frozen; only the head trains (classification caches the features once);
* ``full``: everything trains, with layer-wise learning-rate decay (``full.layer_decay``);
* ``lora``: peft's LoRA on the attention (``qkv``, ``proj``) and MLP (``fc1``, ``fc2``) projections;
* ``vpt``: learnable prompt tokens, shallow or deep (:mod:`.vpt`);
* ``ssf``: per-channel scale and shift after every layer (:mod:`.ssf`);
* ``bitfit``: biases only (Ben Zaken et al., 2022).

The head (or segmentation decoder) always trains. :func:`export_encoder`
turns an adapted encoder back into a plain one (LoRA and SSF merged into the
weights) for ``save_pretrained``.
"""

from __future__ import annotations

import copy

import torch.nn as nn

METHODS = ("linear_probe", "full", "lora", "vpt", "ssf", "bitfit")
LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # the ViT's attention and MLP projections


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def adapt_encoder(encoder: nn.Module, method: str, lora: dict | None = None, vpt: dict | None = None) -> nn.Module:
    """The encoder prepared for ``method``: its trainable parameters set, adapter modules added."""
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
        from .ssf import add_ssf

        return add_ssf(encoder)
    if method == "vpt":
        from .vpt import PromptedViT

        return PromptedViT(encoder, **(vpt or {}))
    from peft import LoraConfig, get_peft_model

    args = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None, **(lora or {})}
    targets = args["target_modules"] or LORA_TARGETS
    if isinstance(targets, str) and not any(True for n, _ in encoder.named_modules() if _full_match(targets, n)):
        raise ValueError(f"LoRA: no layer of {type(encoder).__name__} matches target_modules {targets!r} "
                         "(set lora.target_modules to layer names, e.g. for a CNN ['conv1', 'conv2'])")
    config = LoraConfig(r=args["r"], lora_alpha=args["alpha"], lora_dropout=args["dropout"], target_modules=targets)
    return get_peft_model(encoder, config)


def _full_match(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


def is_lora(encoder: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(encoder, PeftModel)


def export_encoder(encoder: nn.Module) -> nn.Module:
    """A plain medfm encoder with the adaptation folded in (a copy): LoRA merged (``merge_and_unload``),
    SSF merged, VPT's base ViT (prompts live in the task model, not in a plain encoder)."""
    from .vpt import PromptedViT

    enc = copy.deepcopy(encoder)
    if is_lora(enc):
        enc = enc.merge_and_unload()
    if isinstance(enc, PromptedViT):
        enc = enc.vit
    if hasattr(enc, "ssf"):
        from .ssf import merge_ssf

        enc = merge_ssf(enc)
    for p in enc.parameters():
        p.requires_grad_(True)
    return enc


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
