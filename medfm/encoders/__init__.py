"""Encoders: one ViT for 2D and 3D, ResNets, a text encoder, the CLIP model that joins them.

``registry`` (names -> builders), ``factory`` (build, load, model + transforms) and ``weights``
(checkpoint reading and adaptation) are apart, as in timm.
"""

from . import cnn, vit  # noqa: F401  (registers the encoders)
from .clip import CLIP
from .cnn import ResNetEncoder
from .factory import create_encoder, create_model_and_transforms, from_pretrained, preprocess_transform, saved_architecture
from .params import layer_decay_param_groups
from .registry import describe_encoder, list_encoders, register_encoder
from .text import TextEncoder, create_text_encoder, default_text_model_path
from .vit import ViT
from .weights import adapt_state_dict, load_pretrained

__all__ = [
    "saved_architecture",
    "ViT",
    "ResNetEncoder",
    "TextEncoder",
    "CLIP",
    "create_encoder",
    "create_model_and_transforms",
    "preprocess_transform",
    "create_text_encoder",
    "default_text_model_path",
    "from_pretrained",
    "list_encoders",
    "describe_encoder",
    "register_encoder",
    "load_pretrained",
    "adapt_state_dict",
    "layer_decay_param_groups",
]
