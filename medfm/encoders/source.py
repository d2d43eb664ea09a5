"""Where an encoder's weights come from, resolved once: the one function that turns what a user gave (a run
folder, a medfm encoder folder, a public model file or folder, ``hf:ORG/NAME``, ``timm:<name>``, a weight
file) into the architecture, the weights and the preprocessing.

Every entry point goes through :func:`resolve_source`: ``create_encoder(pretrained=...)``, a recipe's
``encoder.pretrained`` (the architecture adopted when the recipe loads, the weights loaded when the run
builds), ``--encoder`` / ``--pretrained`` on the command line, ``medfm.load`` and
``create_model_and_transforms``. A public checkpoint is converted by its format once per process: the last
resolution is kept, so a run that reads the architecture and then builds converts once (counted in
:data:`medfm.encoders.formats.CONVERSIONS`). A run records the converted architecture in its recipe and its
weights in its own ``model/`` and ``encoder/``, so evaluating or reloading it never reads the source again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medfm.artifacts import CONFIG_NAME

from .formats import Converted, convert_checkpoint, is_public, open_checkpoint
from .shipped import shipped_folder


def encoder_folder(given: str | os.PathLike) -> str:
    """A run folder means its ``encoder/`` (what pretraining and fine-tuning runs export); anything else is
    passed on as it is. The one place that decides it."""
    path = Path(str(given))
    return str(path / "encoder") if (path / "encoder" / CONFIG_NAME).is_file() else str(given)


@dataclass
class EncoderSource:
    """What ``given`` names, resolved: ``kind`` is ``medfm`` (a ``save_pretrained`` folder or hub id),
    ``public`` (a checkpoint of a format ``medfm models`` lists, ``converted`` holding its architecture,
    weights and preprocessing), ``timm`` (``timm:<name>``) or ``file`` (a bare timm / medfm-layout state dict,
    ``state_dict`` holding its tensors as read, so loading it reads the file no second time)."""

    given: str
    path: str
    kind: str
    converted: Converted | None = None
    state_dict: dict | None = None

    def architecture(self, spatial_dims: int | None = None) -> dict | None:
        """``{"name", **constructor arguments}`` that rebuild a public model's network (its native position
        grid only where it keeps its own spatial dims: a 2D grid does not carry over to an inflated 3D model);
        None for anything else (a medfm folder's saved architecture is read by ``saved_architecture``)."""
        if self.converted is None:
            return None
        args = dict(self.converted.args)
        if spatial_dims is not None and spatial_dims != self.converted.source.get("spatial_dims", 2):
            args.pop("pos_size", None)
        return {"name": self.converted.architecture, **args}


_LAST: tuple[tuple, EncoderSource] | None = None  # the last resolution: a run reads the architecture, then builds


def _stamp(path: str) -> tuple:
    """What identifies a source's content cheaply (path, size and modification time of the file or folder)."""
    p = Path(path)
    try:
        st = p.stat()
        return (str(p.resolve()), st.st_mtime_ns, st.st_size, tuple(sorted((c.name, c.stat().st_mtime_ns) for c in p.iterdir())) if p.is_dir() else ())
    except OSError:
        return (path,)


def resolve_source(given: str | os.PathLike) -> EncoderSource:
    """Resolve ``given`` (see the module docstring); a public checkpoint is converted here, once: the same
    source asked again (unchanged on disk) returns the kept resolution."""
    global _LAST
    given = str(given)
    path = encoder_folder(shipped_folder(given))
    if path.startswith("timm:"):
        return EncoderSource(given, path, "timm")
    if not is_public(path):
        p = Path(path)
        kind = "file" if p.is_file() else "medfm"
        return EncoderSource(given, path, kind)
    key = _stamp(path)
    if _LAST is not None and _LAST[0] == key:
        return _LAST[1]
    ckpt = open_checkpoint(path)
    converted = convert_checkpoint(ckpt)
    source = (EncoderSource(given, path, "public", converted) if converted is not None
              else EncoderSource(given, path, "file", state_dict=ckpt.state_dict))
    _LAST = (key, source)
    return source


def forget_sources() -> None:
    """Drop the kept resolution (its converted weights) once a model is built from it."""
    global _LAST
    _LAST = None
