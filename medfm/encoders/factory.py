"""Building encoders, after timm's ``_factory``: by registered name (random or pretrained weights), from a
saved folder, or together with the preprocessing they were trained with (open_clip's
``create_model_and_transforms``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn
from monai.transforms import Compose

from medfm.artifacts import load, read_config
from medfm.data.preprocess import Preprocess

from .formats import is_public, list_formats
from .shipped import shipped_folder
from .source import EncoderSource, forget_sources, resolve_source
from .registry import encoder_arguments, encoder_entrypoint, encoder_family, list_encoders
from .vit import vit_size_name
from .weights import load_pretrained


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
      * ``"timm:<model name>"``: timm's pretrained weights for that model (needs network);
      * a public model of a format ``medfm models`` lists (a Hugging Face / open_clip folder, an original
        checkpoint, ``hf:ORG/NAME``): converted, built with its own architecture (``name`` must be its
        family's) and its recorded preprocessing.
    A ``save_pretrained`` folder also brings its recorded preprocessing (``model.preprocess``) and its
    readout (:data:`READOUT`: ``global_pool``, ``fc_norm``) unless ``kwargs`` set one.
    """
    builder = encoder_entrypoint(name)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    source = resolve_source(pretrained) if pretrained is not None else None
    converted = source.converted if source is not None else None
    if converted is not None:  # a public model: its whole architecture, converted once for building and loading
        if converted.architecture != name:
            raise ValueError(f"{pretrained}: a {converted.architecture} checkpoint; build it as "
                             f"{converted.architecture!r}, not {name!r} (a recipe's encoder.pretrained does so by itself)")
        arch = source.architecture(spatial_dims)
        arch.pop("name")
        kwargs = {**arch, **kwargs}
    elif source is not None:
        saved = _medfm_architecture(source.path) or {}
        kwargs = {**{k: saved[k] for k in READOUT if k in saved}, **kwargs}
    model = builder(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **kwargs)
    if source is not None:
        load_pretrained(model, source.path, converted)
    return model


def build_encoder(section: dict, pretrained: bool = True) -> nn.Module:
    """The encoder a recipe's ``encoder`` section describes: the one builder of every run kind (pretraining,
    fine-tuning, benchmarks). ``name`` and constructor arguments (a key set to null takes the encoder's
    default, e.g. ``patch_size: null`` for a ResNet) and the weights ``section["pretrained"]`` names
    (:func:`create_encoder`), unless ``pretrained=False`` (a reload: the weights come from the artifact)."""
    kw = {k: v for k, v in section.items() if v is not None}
    if not pretrained:
        kw.pop("pretrained", None)
    encoder = create_encoder(kw.pop("name"), **kw)
    forget_sources()  # the run has what it converted: the converted weights need not stay in memory
    return encoder


READOUT = ("global_pool", "fc_norm")  # how a ViT pools its tokens: a recipe may read a saved encoder another way


def saved_architecture(pretrained: str | os.PathLike, spatial_dims: int | None = None) -> dict | None:
    """The registered name and constructor arguments the weights ``pretrained`` names were built with: for a
    public model of a known format, its family and every argument that rebuilds the upstream network (its
    native position grid where ``spatial_dims`` keeps its own); for a medfm folder or run, see
    :func:`_medfm_architecture`; None for anything else (a weight file, ``timm:<name>``)."""
    source = resolve_source(pretrained)
    if source.converted is not None:
        return source.architecture(spatial_dims)
    return _medfm_architecture(source.path) if source.kind == "medfm" else None


def _medfm_architecture(pretrained: str | os.PathLike) -> dict | None:
    """``{name, *family.adopt_keys}`` of a medfm ``save_pretrained`` folder (None for anything else: a weight
    file, ``timm:<name>``, a folder without a medfm config), so a recipe that loads the folder builds the
    network the weights were trained with and reads it out as it was trained to be read (:data:`READOUT`).
    The name is the saved ``architecture`` (folders written before it was saved: inferred from the class and
    its widths). Dimensions and channels are left to the recipe: a 2D encoder inflates into a 3D task and
    input channels adapt (``load_pretrained``). A family that public models convert into (``dinov2``,
    ``clip_vit``, ...: sizes are arguments, not names) gives every saved constructor argument."""
    path = Path(str(pretrained))
    if not (path / "config.json").is_file():
        return None
    config = read_config(path)
    name = config.get("architecture") or _legacy_architecture(config)
    if name not in list_encoders():
        return None
    keys = encoder_family(name).adopt_keys
    if name in {f.architecture for f in list_formats()}:
        keys = tuple(k for k in encoder_arguments(name) if k not in RECIPE_OWNED)
    return {"name": name, **{k: config[k] for k in keys if k in config}}


RECIPE_OWNED = ("spatial_dims", "in_chans", "img_size", "drop_path_rate")  # the task decides these, not the weights


def _legacy_architecture(config: dict) -> str | None:
    """The registered name of an encoder folder saved without ``architecture``."""
    kind = str(config.get("medfm_class", "")).rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    if kind == "ViT":
        return vit_size_name(config)
    if kind == "ResNetEncoder":
        return f"resnet{config.get('depth')}"
    return None


def from_pretrained(model_id: str | os.PathLike, **hub_kwargs: Any) -> nn.Module:
    """Rebuild any medfm encoder from a ``save_pretrained`` folder or hub id, whatever its class."""
    return load(model_id, **hub_kwargs)


def preprocess_transform(preprocess: Preprocess | dict | None, train: bool = False, size: Any = "default") -> Compose:
    """The MONAI dict transform a preprocessing record describes (:class:`medfm.data.Preprocess`); ``size``
    overrides the recorded size (None: keep the input size)."""
    if not preprocess:
        raise ValueError("this encoder has no recorded preprocessing (saved before medfm recorded it, or "
                         "never trained by a medfm run): pass a preset explicitly")
    return Preprocess.read(preprocess).transform(train=train, size=size)


def from_converted(source: EncoderSource, spatial_dims: int | None = None, in_chans: int = 1) -> nn.Module:
    """The encoder of a public model (``source`` resolved by :func:`resolve_source`) at the input size its
    authors used, its position grid kept native, its own spatial dims (``spatial_dims`` inflates a 2D one),
    with its weights and preprocessing."""
    converted = source.converted
    size = (converted.preprocess or {}).get("size", 224)
    dims = spatial_dims or converted.source.get("spatial_dims", 2)
    arch = source.architecture(dims)
    model = encoder_entrypoint(arch.pop("name"))(spatial_dims=dims, in_chans=in_chans, img_size=size, **arch)
    return load_pretrained(model, source.path, converted)


def create_model_and_transforms(model_id: str | os.PathLike, spatial_dims: int | None = None, in_chans: int = 1,
                                **hub_kwargs: Any) -> tuple[nn.Module, Compose]:
    """An encoder and the evaluation preprocessing it was trained with, together, from anything
    :func:`resolve_source` takes (a medfm encoder folder or run, a public model of a format ``medfm models``
    lists, ``hf:ORG/NAME``); a public model at the input size its authors used, with their preprocessing (the
    intensity scaling in the transform, their normalisation inside the encoder: ``InputNorm``)."""
    source = resolve_source(model_id)
    if source.converted is not None:
        model = from_converted(source, spatial_dims, in_chans)
    else:
        model = from_pretrained(source.path, **hub_kwargs)
    return model, preprocess_transform(getattr(model, "preprocess", None))


def load_model(model_id: str | os.PathLike, **hub_kwargs: Any) -> nn.Module:
    """``medfm.load``: any saved medfm model or run (its main artifact), and a public model folder or file
    that ``--encoder`` takes (converted, as :func:`create_model_and_transforms` builds it), or ``medfm:NAME``."""
    model_id = shipped_folder(str(model_id))
    if is_public(model_id):
        source = resolve_source(model_id)
        if source.converted is not None:
            return from_converted(source)
    return load(model_id, **hub_kwargs)
