"""medfm: medical foundation models. ``medfm.load(path)`` rebuilds any saved medfm model (encoder, task model,
CLIP model, text tower, generator) or the main model of a run folder, and reads a public model folder or file
that ``--encoder`` takes (DINOv2 / RAD-DINO, BiomedCLIP, SAM, ...: converted, with its preprocessing)."""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def load(path: str | os.PathLike, **hub_kwargs: Any):
    """The model at ``path`` (see the package docstring): :func:`medfm.encoders.factory.load_model`."""
    from medfm.encoders.factory import load_model  # the encoder families convert public formats

    return load_model(path, **hub_kwargs)
