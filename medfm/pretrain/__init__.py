"""Self-supervised pretraining (MAE, DINO) as LightningModules driven by YAML recipes."""

from .dino import DINO, DINOModule
from .mae import MAEModule, MaskedAutoencoder, patchify, unpatchify
from .recipe import load_recipe, run_pretrain

__all__ = ["MaskedAutoencoder", "MAEModule", "DINO", "DINOModule", "patchify", "unpatchify", "load_recipe",
           "run_pretrain"]
