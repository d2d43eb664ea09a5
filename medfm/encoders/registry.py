"""Encoder registry, after timm's ``_registry``: names -> builder functions, nothing else.

Each registered name maps to a function ``fn(spatial_dims, in_chans, img_size, **kwargs) -> Family``
whose return annotation names the encoder family (a class following :class:`medfm.encoders.Encoder`); its
docstring's first line is what ``medfm models`` prints. The encoder it builds records the name as its
``architecture`` (saved in its ``config.json``). Building and weight loading live in
:mod:`medfm.encoders.factory`; checkpoint adaptation in :mod:`medfm.encoders.weights`.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register an encoder builder under its function name; what it builds records that name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"encoder {fn.__name__!r} is registered twice")
    family = typing.get_type_hints(fn).get("return")
    if not isinstance(family, type):
        raise TypeError(f"encoder builder {fn.__name__!r} must annotate the class it returns (-> MyEncoder)")

    @functools.wraps(fn)
    def build(*args, **kwargs):
        model = fn(*args, **kwargs)
        model.architecture = fn.__name__
        return model

    build.family = family  # type: ignore[attr-defined]
    _REGISTRY[fn.__name__] = build
    return build


def unregister_encoder(name: str) -> None:
    """Remove a registered name (for tests and notebooks that register a family of their own)."""
    _REGISTRY.pop(name, None)


def list_encoders() -> list[str]:
    """Names accepted by :func:`medfm.encoders.create_encoder`, sorted."""
    return sorted(_REGISTRY)


def encoder_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name`` (a clear error listing the known names otherwise)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; registered: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def encoder_family(name: str) -> type:
    """The class the builder registered as ``name`` returns."""
    return encoder_entrypoint(name).family  # type: ignore[attr-defined]


def encoder_arguments(name: str) -> set[str]:
    """The keyword arguments a recipe's ``encoder`` section may give for ``name``: the builder's own, and the
    family's constructor's when the builder passes ``**kwargs`` on."""
    fn = inspect.unwrap(encoder_entrypoint(name))
    params = inspect.signature(fn).parameters.values()
    keys = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        init = inspect.signature(encoder_family(name).__init__).parameters.values()
        keys |= {p.name for p in init if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    return keys


def describe_encoder(name: str) -> str:
    """First line of the builder's docstring."""
    return (encoder_entrypoint(name).__doc__ or "").strip().splitlines()[0]
