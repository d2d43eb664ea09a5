"""Diffusion generators for 2D images and 3D volumes: class-, text- or mask-conditioned, trained on the run
layer (``medfm pretrain generators/diffusion_2d.yaml``), sampled by seed (``medfm generate``), exported as
sets every recipe reads, and evaluated by what they are for (``medfm evaluate RUN``)."""

from .export import export_generated, model_hash, sample_grid
from .generator import DiffusionGenerator
from .pipeline import SAMPLERS, DiffusionPipeline
from .module import DiffusionModule
from .plugin import DiffusionPlugin
from .spec import DiffusionConfig, DiffusionSpec
from .recipe import GeneratorDataConfig, generator_schema, is_generator_recipe, load_generator_recipe, run_generator
from .registry import GENERATORS

__all__ = [
    "GENERATORS", "SAMPLERS", "DiffusionConfig", "DiffusionSpec", "DiffusionGenerator", "DiffusionModule", "DiffusionPipeline", "DiffusionPlugin",
    "GeneratorDataConfig", "export_generated", "generator_schema", "is_generator_recipe", "load_generator_recipe",
    "model_hash", "run_generator", "sample_grid",
]
