"""Tuning methods: which encoder parameters a fine-tuning run trains, and how the result is exported.

One switch (``method`` in a task recipe), each a registered :class:`TuningMethod` (``@register_tuning``):

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
from typing import Callable

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model

from medfm.run.recipe import config_from_signature

from .ssf import add_ssf, merge_ssf
from .vpt import PromptedViT


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


@dataclass(frozen=True)
class TuningMethod:
    """One fine-tuning method: ``apply(encoder, section)`` prepares the encoder (trainable parameters set, adapter
    modules added; ``section`` is the method's recipe section as a dict, or None); ``section`` is that section's
    dataclass (None: the method has no options); ``frozen_encoder``: the encoder's own weights never train, so
    it also keeps its normalisation statistics and dropout off while the head trains (``FrozenEncoder``)."""

    name: str
    apply: Callable[[nn.Module, dict | None], nn.Module]
    section: type | None = None
    frozen_encoder: bool = False


METHODS: dict[str, TuningMethod] = {}  # every tuning method by name, in registration order


def register_tuning(name: str, section: type | None = None, frozen_encoder: bool = False):
    """Decorator: register ``apply(encoder, section) -> encoder`` as the tuning method ``name`` (the one line a
    new method adds, as ``@register_encoder`` and ``@TASKS.register`` are for encoders and tasks)."""

    def register(apply: Callable[[nn.Module, dict | None], nn.Module]):
        if name in METHODS:
            raise ValueError(f"tuning method {name!r} is registered twice")
        METHODS[name] = TuningMethod(name, apply, section, frozen_encoder)
        return apply

    return register


def tuning_method(name: str) -> TuningMethod:
    if name not in METHODS:
        raise ValueError(f"unknown fine-tuning method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def method_sections() -> dict[str, type]:
    """The recipe sections of the methods that have options (``full``, ``lora``, ``vpt``, ...), by name."""
    return {name: m.section for name, m in METHODS.items() if m.section is not None}


def freezes_encoder(method: str) -> bool:
    """Whether ``method`` keeps the encoder's own weights frozen (the one place that knows: linear probe)."""
    return tuning_method(method).frozen_encoder


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@register_tuning("linear_probe", frozen_encoder=True)
def _linear_probe(encoder: nn.Module, section: dict | None) -> nn.Module:
    """Encoder frozen; only the head trains."""
    return _freeze(encoder).eval()


@register_tuning("full", section=FullConfig)
def _full(encoder: nn.Module, section: dict | None) -> nn.Module:
    """Everything trains (layer-wise LR decay is the task module's: ``full.layer_decay``)."""
    return encoder


@register_tuning("lora", section=LoRAConfig)
def _lora(encoder: nn.Module, section: dict | None) -> nn.Module:
    """peft's LoRA on the encoder's ``lora_targets`` (or ``lora.target_modules``)."""
    args = asdict(LoRAConfig(**(section or {})))
    targets = args["target_modules"] or getattr(encoder, "lora_targets", None)
    if targets is None or isinstance(targets, str) and not any(_full_match(targets, n) for n, _ in encoder.named_modules()):
        raise ValueError(f"LoRA: no layer of {type(encoder).__name__} matches target_modules {targets!r} "
                         "(set lora.target_modules to layer names, e.g. for a CNN ['conv1', 'conv2'])")
    config = LoraConfig(r=args["r"], lora_alpha=args["alpha"], lora_dropout=args["dropout"], target_modules=targets)
    return get_peft_model(_freeze(encoder), config)


@register_tuning("vpt", section=VPTConfig)
def _vpt(encoder: nn.Module, section: dict | None) -> nn.Module:
    """Learnable prompt tokens, shallow or deep (:mod:`.vpt`)."""
    return PromptedViT(_freeze(encoder), **asdict(VPTConfig(**(section or {}))))


@register_tuning("ssf")
def _ssf(encoder: nn.Module, section: dict | None) -> nn.Module:
    """Per-channel scale and shift after every layer (:mod:`.ssf`)."""
    return add_ssf(_freeze(encoder))


@register_tuning("bitfit")
def _bitfit(encoder: nn.Module, section: dict | None) -> nn.Module:
    """Biases only (Ben Zaken et al., 2022)."""
    for name, p in _freeze(encoder).named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
    return encoder


def adapt_encoder(encoder: nn.Module, method: str, **sections: dict | None) -> nn.Module:
    """The encoder prepared for ``method`` (``lora={...}`` / ``vpt={...}``: that method's section, defaults from
    its dataclass; sections of other methods are ignored)."""
    return tuning_method(method).apply(encoder, sections.get(method))


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
