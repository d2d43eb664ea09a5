"""open_clip models with a timm image trunk (BiomedCLIP and other ``hf-hub:`` releases) in medfm.

A hub folder holds ``open_clip_config.json`` (``model_cfg``: ``vision_cfg.timm_model_name``, ``text_cfg`` with
a Hugging Face text model, ``embed_dim``; ``preprocess_cfg``: mean / std) and the weights
(``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``): ``visual.trunk.*`` (a timm ViT),
``visual.head.proj.weight``, ``text.transformer.*`` (a Hugging Face BERT), ``text.proj.*`` (a linear or MLP
projection), ``logit_scale``.

Two uses:
* the image tower alone as an encoder (format ``open-clip-timm``, registered name ``clip_vit``): medfm's ViT,
  with the release's mean / std as its :class:`InputNorm`, for every fine-tuning recipe, 2D and 3D;
* the whole model as a medfm :class:`~medfm.encoders.clip.CLIP` (:func:`clip_from_open_clip`): the same ViT,
  a :class:`~medfm.encoders.text.TextEncoder` around the BERT (class-token pooling), the projections and the
  temperature; ``medfm models convert`` writes it as a CLIP run folder that ``medfm evaluate`` (zero-shot,
  retrieval) and ``clip.init`` (LiT / partial fine-tuning) read. The BERT's config and tokenizer come from
  ``text_cfg.hf_model_name`` / ``hf_tokenizer_name``: a folder, or a hub id in the local cache.
"""

from __future__ import annotations

import os

import torch

from medfm.data import Preprocess

from .clip import CLIP
from .factory import from_converted
from .source import EncoderSource
from .formats import Checkpoint, Converted, Format, count_blocks, open_checkpoint, register_format
from .registry import register_encoder
from .vit import ViT, mlp_args

OPENAI_NORM = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
POOLING = {"cls_last_hidden_state_pooler": "cls", "cls_pooler": None, "mean_pooler": "mean"}


@register_encoder
def clip_vit(spatial_dims: int = 2, in_chans: int = 1, img_size=224, **kwargs) -> ViT:
    """Image tower of an open_clip model with a timm ViT trunk (BiomedCLIP): medfm's ViT, ViT-B/16 by default."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, input_norm={"channels": 3, **OPENAI_NORM})
    args.update(kwargs)
    return ViT(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **args)


def _model_cfg(ckpt: Checkpoint) -> tuple[dict, dict]:
    cfg = ckpt.configs.get("open_clip_config.json", {})
    return cfg.get("model_cfg", {}), cfg.get("preprocess_cfg", {})


def from_open_clip_image(ckpt: Checkpoint) -> Converted:
    model_cfg, pre = _model_cfg(ckpt)
    vision = model_cfg.get("vision_cfg", {})
    if vision.get("timm_pool", "") not in ("", "token") or vision.get("timm_proj", "linear") not in ("linear", "none"):
        raise ValueError(f"timm_pool {vision.get('timm_pool')!r} / timm_proj {vision.get('timm_proj')!r}: only a "
                         "class-token trunk with a linear projection (BiomedCLIP's) is converted")
    sd = {k.removeprefix("visual.trunk."): v for k, v in ckpt.state_dict.items() if k.startswith("visual.trunk.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    dim = sd["cls_token"].shape[-1]
    proj = sd["patch_embed.proj.weight"]
    size = vision.get("image_size", 224)
    norm = {"channels": proj.shape[1], "mean": pre.get("mean", OPENAI_NORM["mean"]), "std": pre.get("std", OPENAI_NORM["std"])}
    args = dict(embed_dim=dim, depth=count_blocks(sd), num_heads=max(1, dim // 64), patch_size=proj.shape[-1], pos_size=size,
                **mlp_args(sd), input_norm=norm)
    return Converted("clip_vit", args, sd, Preprocess("radiograph_2d", size).record(),
                     {"img_size": size, "patch_size": proj.shape[-1], "spatial_dims": 2})


register_format(Format(
    name="open-clip-timm", architecture="clip_vit",
    source="open_clip hub folder with a timm ViT trunk (open_clip_config.json + weights; BiomedCLIP)",
    preprocess="RGB, preprocess_cfg mean/std (inside the encoder), image_size px (224)",
    license="BiomedCLIP: MIT",
    example="medfm models convert hf:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --out biomedclip; "
            "medfm evaluate biomedclip --data data/medpix2/manifest.csv --classes type --split dev",
    keys=(r"^visual\.trunk\.patch_embed\.proj\.weight$", r"^visual\.trunk\.cls_token$"),
    convert=from_open_clip_image,
    accepts=lambda ckpt: "open_clip_config.json" in ckpt.configs,
))


def _text_tower(text_cfg: dict, sd: dict[str, torch.Tensor]):
    """A :class:`TextEncoder` around the open_clip text tower's Hugging Face model, with its weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .text import TextEncoder

    name = text_cfg.get("hf_model_name")
    if not name:
        raise ValueError("text_cfg has no hf_model_name: only open_clip models with a Hugging Face text tower convert")
    pooling = POOLING.get(text_cfg.get("hf_pooler_type", "cls_last_hidden_state_pooler"), "unknown")
    if pooling is None or pooling == "unknown":
        raise ValueError(f"text pooler {text_cfg.get('hf_pooler_type')!r} is not converted (class-token or mean pooling)")
    try:
        config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(text_cfg.get("hf_tokenizer_name", name))
    except OSError as e:
        raise FileNotFoundError(f"the text tower's config and tokenizer ({name}) are neither a folder nor in the "
                                f"Hugging Face cache: download them where a network exists ({e.__class__.__name__})") from None
    model = AutoModel.from_config(config, add_pooling_layer=False)
    weights = {k.removeprefix("text.transformer."): v for k, v in sd.items() if k.startswith("text.transformer.")}
    weights = {k: v for k, v in weights.items() if not k.startswith("pooler.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"text tower weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.name_or_path = str(name)
    return TextEncoder.from_parts(model, tokenizer, max_length=text_cfg.get("context_length", 77), pooling=pooling)


def clip_from_open_clip(source: str | os.PathLike) -> CLIP:
    """The open_clip model at ``source`` (a hub folder or ``hf:ORG/NAME``) as a medfm CLIP (eval mode)."""
    ckpt = open_checkpoint(source)
    if "open_clip_config.json" not in ckpt.configs:
        raise ValueError(f"{source}: no open_clip_config.json (not an open_clip hub folder)")
    model_cfg, _ = _model_cfg(ckpt)
    image = from_open_clip_image(ckpt)
    encoder = from_converted(EncoderSource(str(source), str(source), "public", image))  # as `--encoder FOLDER` builds it
    sd = ckpt.state_dict
    text = _text_tower(model_cfg.get("text_cfg", {}), sd)
    mlp = "text.proj.0.weight" in sd
    siglip = "logit_bias" in sd
    clip = CLIP(encoder, text, embed_dim=model_cfg["embed_dim"], loss="siglip" if siglip else "clip",
                text_proj_hidden=sd["text.proj.0.weight"].shape[0] if mlp else None)
    state = {"image_proj.weight": sd["visual.head.proj.weight"], "logit_scale": sd["logit_scale"].reshape(())}
    if mlp:
        state.update({"text_proj.0.weight": sd["text.proj.0.weight"], "text_proj.2.weight": sd["text.proj.2.weight"]})
    else:
        state["text_proj.weight"] = sd["text.proj.weight"]
    if siglip:
        state["logit_bias"] = sd["logit_bias"].reshape(())
    missing, unexpected = clip.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.startswith(("image_encoder.", "text_encoder."))]
    if left or unexpected:
        raise ValueError(f"{source}: projection weights do not fit: missing {left}, unexpected {unexpected}")
    return clip.eval()
