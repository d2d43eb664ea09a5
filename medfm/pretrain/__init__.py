"""Pretraining as LightningModules driven by YAML recipes: self-supervised (MAE, DINO), dense synthetic
(voxel contrastive, synthetic segmentation), image-text (CLIP) and text-tower adaptation (MLM)."""

from .clip import CLIP, CLIPModule
from .dino import DINO, DINOModule
from .mae import MAEModule, MaskedAutoencoder, patchify, unpatchify
from .recipe import load_recipe, run_pretrain

__all__ = ["MaskedAutoencoder", "MAEModule", "DINO", "DINOModule", "CLIP", "CLIPModule", "patchify", "unpatchify", "load_recipe",
           "run_pretrain"]
