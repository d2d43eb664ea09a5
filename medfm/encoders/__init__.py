"""Encoders: one ViT for 2D and 3D, ResNets, a text encoder, the CLIP model that joins them.

``interface`` (what every encoder offers: :class:`Encoder`, :class:`EncoderBase`), ``registry`` (names ->
builders), ``factory`` (build, load, model + transforms) and ``weights`` (checkpoint reading and
adaptation) are apart, as in timm. A new family is one file with its class and its registered builders,
imported here.
"""

from . import cnn, dinov2, hfclip, monai3d, openclip, sam, vit, xrv  # noqa: F401  (registers the encoders and their formats)
from .clip import CLIP
from .cnn import ResNetEncoder
from .factory import build_encoder, create_encoder, create_model_and_transforms, from_pretrained, preprocess_transform, saved_architecture
from .formats import list_formats
from .input_norm import InputNorm
from .interface import Encoder, EncoderBase
from .params import layer_decay_param_groups
from .registry import describe_encoder, encoder_arguments, encoder_family, list_encoders, register_encoder, unregister_encoder
from .text import TextEncoder, create_text_encoder, default_text_model_path
from .vit import ViT
from .weights import adapt_state_dict, load_pretrained

__all__ = [
    "Encoder",
    "EncoderBase",
    "encoder_arguments",
    "encoder_family",
    "unregister_encoder",
    "saved_architecture",
    "ViT",
    "InputNorm",
    "list_formats",
    "ResNetEncoder",
    "TextEncoder",
    "CLIP",
    "create_encoder",
    "build_encoder",
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
