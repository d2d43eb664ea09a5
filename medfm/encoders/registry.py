"""Encoder registry, after timm's ``@register_model``.

Each registered name maps to a function ``fn(spatial_dims, in_chans, img_size,
**kwargs) -> nn.Module``. :func:`create_encoder` is the one way in: it builds the
model and, if asked, loads weights (a medfm ``save_pretrained`` folder, a hub
id, or a timm/torch state-dict file that is adapted to the model).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_CLASSES: dict[str, type] = {}


def register_encoder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register an encoder factory under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"encoder {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def register_class(cls: type) -> type:
    """Decorator: make a model class rebuildable from a saved config (``medfm_class``)."""
    _CLASSES[cls.__name__] = cls
    return cls


def list_encoders() -> list[str]:
    """Names accepted by :func:`create_encoder`, sorted."""
    return sorted(_REGISTRY)


def create_encoder(
    name: str,
    spatial_dims: int = 2,
    in_chans: int = 1,
    img_size: int | Sequence[int] = 224,
    pretrained: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered encoder for 2D (``spatial_dims=2``) or 3D inputs.

    ``pretrained`` may be:
      * ``None``: random initialisation;
      * a folder written by ``save_pretrained`` (or a hub id holding one): loaded strictly;
      * a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state-dict file, e.g. a timm
        checkpoint: adapted (2D->3D inflation, channel count, position-embedding grid)
        with a warning that lists every adaptation, then loaded strictly;
      * ``"timm:<model name>"``: timm's pretrained weights for that model (needs network).
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; registered: {', '.join(list_encoders())}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    model = _REGISTRY[name](spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **kwargs)
    if pretrained is not None:
        from .weights import load_pretrained

        load_pretrained(model, pretrained)
    return model


def from_pretrained(model_id: str | os.PathLike, **hub_kwargs: Any) -> nn.Module:
    """Rebuild any medfm model from a ``save_pretrained`` folder or hub id, whatever its class."""
    from .hub import CLASS_KEY, read_config

    config = read_config(model_id, **hub_kwargs)
    cls_name = config.get(CLASS_KEY)
    if cls_name not in _CLASSES:
        raise ValueError(
            f"{model_id}: config.json names class {cls_name!r}, which medfm does not know "
            f"(known: {', '.join(sorted(_CLASSES))})"
        )
    return _CLASSES[cls_name].from_pretrained(str(model_id), **hub_kwargs)
