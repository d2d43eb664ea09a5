"""Encoder registry, after timm's ``_registry``: names -> builder functions, nothing else.

Each registered name maps to a function ``fn(spatial_dims, in_chans, img_size, **kwargs) -> nn.Module``
(its docstring's first line is what ``medfm info`` prints). Building and weight loading live in
:mod:`medfm.encoders.factory`; checkpoint adaptation in :mod:`medfm.encoders.weights`.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register an encoder builder under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"encoder {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_encoders() -> list[str]:
    """Names accepted by :func:`medfm.encoders.create_encoder`, sorted."""
    return sorted(_REGISTRY)


def encoder_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` (a clear error listing the known names otherwise)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; registered: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def describe_encoder(name: str) -> str:
    """First line of the builder's docstring."""
    return (encoder_entrypoint(name).__doc__ or "").strip().splitlines()[0]
