"""Load pretrained weights into a medfm encoder, adapting them where the shapes say how.

Adaptations, each reported in one warning that lists the keys it touched:
  * first, what the encoder family converts itself (its ``checkpoint_filter_fn``, timm's idea): the ViT
    resamples its position embeddings to its token grid (a 2D grid in-plane, then repeated along depth),
    the ResNet prefixes a bare network's keys with ``net.``;
  * classifier heads of the source (timm ``head.*``, ``fc.*``) are dropped: medfm
    encoders end at the pooled embedding;
  * 2D -> 3D: a convolution kernel with one dimension fewer than the model's is
    inflated along depth and divided by the depth (I3D inflation), so a constant
    volume gives the same response as the 2D image did;
  * input channels (e.g. RGB -> 1) of the family's ``input_conv``: timm's ``adapt_input_conv`` (sum, or
    repeat and rescale).
Everything else must match exactly: after adaptation the state dict is loaded
strictly, and a mismatch raises an error naming the keys.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import timm
import torch.nn as nn
from safetensors.torch import load_file
from timm.models import adapt_input_conv

from medfm.artifacts import WEIGHTS_NAME, load_state_dict_strict, read_config, resolve_file

from .formats import Converted, is_public, nearest_format, open_checkpoint
from .source import resolve_source

HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")  # classifier heads a source may carry


def read_state_dict(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read weights from a save_pretrained folder / hub id, a state-dict file, ``timm:<name>``, or a public
    model of a format in :mod:`medfm.encoders.formats` (converted to medfm's keys).

    Returns the state dict and a config: a medfm folder's own, or for a public model how its network was
    built (token grid, preprocessing), None for a bare file. Pickled files are read with
    ``torch.load(weights_only=True)``: tensors only, no code.
    """
    source = str(source)
    if source.startswith("timm:"):
        return timm.create_model(source[5:], pretrained=True).state_dict(), None
    if is_public(source):
        resolved = resolve_source(source)
        if resolved.converted is None:  # a timm / medfm-layout state dict: adapted and loaded as it is
            return resolved.state_dict, None
        return resolved.converted.state_dict, resolved.converted.config()
    path = Path(source)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{source}: neither a weight file nor a save_pretrained folder")
    config = read_config(source)  # a save_pretrained folder, or a hub id (downloaded)
    return load_file(resolve_file(source, WEIGHTS_NAME)), config


def adapt_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], config: dict | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Adapt ``state_dict`` to ``model`` (see the module docstring); return it and what was done."""
    own = model.state_dict()
    conv = getattr(model, "input_conv", None)
    patch_w = state_dict.get(conv) if conv else None
    sd, notes = model.checkpoint_filter_fn(dict(state_dict), config, patch_w.ndim - 2 if patch_w is not None else None)
    notes = list(notes)
    dropped = sorted(k for k in sd if k not in own and k.removeprefix("net.").startswith(HEAD_PREFIXES))
    if dropped:
        notes.append(f"dropped classifier head {dropped}")
        for k in dropped:
            del sd[k]
    inflated = []
    for k, v in list(sd.items()):
        if k not in own:
            continue
        target = own[k]
        if k == conv and v.shape[1] != target.shape[1]:
            flat = v.reshape(v.shape[0], v.shape[1], -1, v.shape[-1])
            v = adapt_input_conv(target.shape[1], flat, base_chans=v.shape[1]).reshape(
                v.shape[0], target.shape[1], *v.shape[2:]
            ).to(v.dtype)
            notes.append(f"{k}: input channels {sd[k].shape[1]} -> {target.shape[1]}")
        if v.ndim == target.ndim - 1 and v.ndim >= 4:
            depth = target.shape[2]
            v = v.unsqueeze(2).repeat_interleave(depth, dim=2) / depth
            inflated.append(k)
        sd[k] = v
    if inflated:
        notes.append(f"inflated {len(inflated)} 2D kernel(s) to 3D along depth: {inflated[:5]}{' ...' if len(inflated) > 5 else ''}")
    return sd, notes


def load_pretrained(model: nn.Module, source: str | os.PathLike, converted: Converted | None = None) -> nn.Module:
    """Read weights from ``source``, adapt them to ``model``, load strictly, warn about every adaptation.
    ``converted``: ``source`` already converted (a public model), so it is not read and converted again."""
    state_dict, config = (converted.state_dict, converted.config()) if converted else read_state_dict(source)
    sd, notes = adapt_state_dict(model, state_dict, config)
    try:
        load_state_dict_strict(model, sd, source=str(source))
    except ValueError as e:
        if config is not None or not is_public(source):
            raise
        raise ValueError(f"{e}; {nearest_format(open_checkpoint(source))}") from None
    if config and config.get("preprocess"):  # a medfm folder records how its inputs were prepared
        model.preprocess = config["preprocess"]
    if notes:
        warnings.warn(f"{source} -> {type(model).__name__}: adapted weights: " + "; ".join(notes), stacklevel=2)
    return model
