"""Choosing what to label (``medfm select``) and curating a data set before training (``medfm curate``), both
from foundation-model embeddings."""

from .strategies import NEEDS_MODEL, STRATEGIES, select

__all__ = ["STRATEGIES", "NEEDS_MODEL", "select"]
