"""Procedural randomized-synthesis engine: random label maps with random appearance, 2D and 3D."""

from .appearance import RANGES, RandAppearanced, render
from .engine import SynthConfig, SyntheticDataset, synth_pair, synth_sample
from .export import export_synthetic
from .labels import elastic_deform, random_label_map

__all__ = ["SynthConfig", "SyntheticDataset", "synth_sample", "synth_pair", "render", "RANGES", "RandAppearanced",
           "random_label_map", "elastic_deform", "export_synthetic"]
