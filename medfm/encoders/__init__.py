"""Encoders: one ViT for 2D and 3D, ResNets, a text encoder; registry and weight loading."""

from . import cnn, vit  # noqa: F401  (registers the encoders)
from .cnn import ResNetEncoder
from .params import layer_decay_param_groups
from .registry import create_encoder, from_pretrained, list_encoders, register_encoder
from .text import TextEncoder, create_text_encoder, default_text_model_path
from .vit import ViT
from .weights import adapt_state_dict, load_pretrained

__all__ = [
    "ViT",
    "ResNetEncoder",
    "TextEncoder",
    "create_encoder",
    "create_text_encoder",
    "default_text_model_path",
    "from_pretrained",
    "list_encoders",
    "register_encoder",
    "load_pretrained",
    "adapt_state_dict",
    "layer_decay_param_groups",
]
