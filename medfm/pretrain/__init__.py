"""Pretraining methods as plug-ins of the run layer: self-supervised (MAE, DINO), dense synthetic
(voxel contrastive, synthetic segmentation), image-text (CLIP) and text-tower adaptation (MLM).

Adding a method: one file with its ``Config`` section, its LightningModule and a
:class:`~medfm.pretrain.method.PretrainMethod` subclass decorated with ``@register_method``, plus its
import line below.
"""

from . import clip, dino, mae, synth_contrastive, text_mlm  # noqa: F401  (registers the methods)
from .clip import CLIPModule
from .dino import DINO, DINOModule
from .mae import MAEModule, MaskedAutoencoder, patchify, unpatchify
from .method import PretrainMethod, pretrain_schema
from .recipe import load_recipe, run_pretrain
from .registry import METHODS, register_method

__all__ = ["MaskedAutoencoder", "MAEModule", "DINO", "DINOModule", "CLIPModule", "patchify", "unpatchify",
           "load_recipe", "run_pretrain", "METHODS", "register_method", "PretrainMethod", 
           "pretrain_schema"]
