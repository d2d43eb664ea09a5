"""medfm: medical foundation models. ``medfm.load(folder)`` rebuilds any saved medfm model (encoder,
task model, CLIP model, text tower) or the main model of a run folder."""

from .artifacts import load

__version__ = "0.1.0"
__all__ = ["load", "__version__"]
