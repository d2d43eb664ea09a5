"""A LLaVA-style multimodal model: any medfm encoder (2D or 3D) -> a projector -> a pretrained causal LM.

The design of transformers' ``LlavaForConditionalGeneration``: the text holds one ``<image>`` placeholder token
per image, expanded to the projector's token count; the LM embeds the ids and the image tokens are written over
the placeholders' embeddings (``masked_scatter``); the encoder is read at ``feature_layer`` (-2: the patch tokens
after the second-to-last block, LLaVA's ``vision_feature_layer`` with the ``default`` strategy that drops the
class token). An encoder whose feature maps are a pyramid (CNNs, SegResNet) gives its last map. Any causal LM
:func:`medfm.encoders.language_model.load_language_model` reads works; the packaged SmolLM2 is the default.

The artifact keeps what training changed and where the rest comes from: the encoder (its own sub-folder), the
projector, LoRA's matrices and any unlocked LM blocks; the LM's other weights are read again from
``language_model`` (the packaged SmolLM2 is always here; a folder must still exist). ``medfm export`` merges
LoRA into the LM and writes a transformers LLaVA folder (:mod:`medfm.heads.llava_export`).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from medfm.artifacts import Artifact
from medfm.encoders.language_model import load_language_model

from .chat import IGNORE, IMAGE_TOKEN
from .projector import MultimodalProjector

TWIN = "lm_only"  # the LoRA adapter of the LM-alone twin
LM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lm_hidden_size(lm: nn.Module) -> int:
    return lm.get_input_embeddings().weight.shape[1]


class MultimodalLM(nn.Module, Artifact):
    """Encoder + projector + causal LM.

    Args:
        encoder: a medfm encoder (saved in ``encoder/``).
        language_model: what :func:`load_language_model` reads (None: the packaged SmolLM2).
        projector / pool / resampler: the :class:`MultimodalProjector`.
        feature_layer: the encoder block whose patch tokens are read (negative counts from the end).
        lora: ``{"r", "alpha", "dropout", "targets"}`` of LoRA on the LM (peft), or None.
        unlock_lm: regexes of LM parameter names trained in full (and saved).
        lm_only_twin: a second LoRA adapter (``lm_only``) on the same LM, trained on the same conversations
            without image tokens: the "LM alone, fine-tuned" control (the VQA task's question-only twin).
    """

    components = ("encoder",)
    partial_state = True

    def __init__(self, encoder: nn.Module, language_model: str | None = None, projector: str = "mlp2x_gelu",
                 pool: Sequence[int] | None = None, resampler: dict | None = None, feature_layer: int = -2,
                 lora: dict | None = None, unlock_lm: Sequence[str] = (), lm_only_twin: bool = False):
        super().__init__()
        self.encoder = encoder
        lm, self.tokenizer = load_language_model(language_model)
        if IMAGE_TOKEN not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id >= lm.get_input_embeddings().weight.shape[0]:
            # one new row, zero (never read: image tokens are written over it; never generated: suppressed)
            lm.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            with torch.no_grad():
                lm.get_input_embeddings().weight[self.image_token_id:].zero_()
                if lm.get_output_embeddings() is not None:
                    lm.get_output_embeddings().weight[self.image_token_id:].zero_()
        self.feature_layer = feature_layer
        self.projector = MultimodalProjector(encoder.embed_dim, lm_hidden_size(lm), projector, pool, resampler)
        self.lora = dict(lora) if lora else None
        if self.lora:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=int(self.lora.get("r", 8)), lora_alpha=float(self.lora.get("alpha", 16)),
                             lora_dropout=float(self.lora.get("dropout", 0.0)),
                             target_modules=list(self.lora.get("targets") or LM_LORA_TARGETS))
            with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                lm = get_peft_model(lm, cfg)
                if lm_only_twin:
                    lm.add_adapter(TWIN, cfg)
                    lm.set_adapter("default")
        self.twin = bool(self.lora and lm_only_twin)
        self.lm = lm
        self.unlock_lm = list(unlock_lm)

    # ------------------------------------------------------------------ what the artifact keeps
    def lm_kept(self, name: str) -> bool:
        """Whether an LM parameter (``name`` inside ``lm.``) is saved: LoRA's and the unlocked ones."""
        return "lora_" in name or any(re.search(p, name) for p in self.unlock_lm)

    def _own_state(self) -> dict[str, torch.Tensor]:
        state = super()._own_state()
        return {k: v for k, v in state.items() if not k.startswith("lm.") or self.lm_kept(k[3:])}

    @contextlib.contextmanager
    def adapter(self, name: str | None):
        """The LM with LoRA adapter ``name`` active (``"default"``: the model's; ``"lm_only"``: the twin's; None:
        no LoRA, the LM as pretrained), restored afterwards; trainable flags are kept as they were."""
        if not self.lora or name == "default":
            yield self
            return
        if name is None:
            with self.lm.disable_adapter():
                yield self
            return
        flags = {n: p.requires_grad for n, p in self.lm.named_parameters()}
        self.lm.set_adapter(name)
        try:
            yield self
        finally:
            self.lm.set_adapter("default")
            for n, p in self.lm.named_parameters():
                p.requires_grad_(flags[n])

    # ------------------------------------------------------------------ images -> LM embeddings
    def tokens_per_image(self, size: Sequence[int]) -> int:
        return self.projector.num_tokens(self.encoder.token_grid(size))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's feature map (N, C, *grid) at ``feature_layer`` (a pyramid encoder: its last map)."""
        if getattr(self.encoder, "feature_maps", "tokens") == "tokens":
            return self.encoder.forward_intermediates(images, indices=[self.feature_layer])[0]
        return self.encoder.forward_intermediates(images)[-1]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N images, C, *spatial) -> (N, tokens per image, LM hidden size)."""
        return self.projector(self.feature_map(images))

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """The LM's input embeddings with the image tokens written over the placeholders, in order."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        n = int(mask.sum())
        if images is None or images.shape[0] == 0:
            if n:
                raise ValueError(f"the text holds {n} image token(s) but no image was given")
            return embeds
        feats = self.image_features(images).to(embeds.dtype)
        if feats.shape[0] * feats.shape[1] != n:
            raise ValueError(f"{images.shape[0]} image(s) give {feats.shape[0] * feats.shape[1]} image tokens but the "
                             f"text holds {n} placeholder token(s)")
        return embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats.reshape(-1, feats.shape[-1]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """The LM's output (``.logits``; ``.loss`` on the labelled tokens when ``labels`` is given)."""
        return self.lm(inputs_embeds=self.embed(input_ids, images), attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 images: torch.Tensor | None = None, max_new_tokens: int = 32, num_beams: int = 1,
                 **kwargs) -> torch.Tensor:
        """New token ids (B, <= max_new_tokens) after left-padded prompts, with the LM's KV cache; greedy by
        default; the image placeholder is never generated."""
        embeds = self.embed(input_ids, images)
        tok = self.tokenizer
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                num_beams=num_beams, do_sample=False, pad_token_id=tok.pad_token_id,
                                suppress_tokens=[self.image_token_id], **kwargs)


def expand_images(ids: list[int], labels: list[int], image_id: int, n: int) -> tuple[list[int], list[int]]:
    """Each image placeholder id repeated ``n`` times (its labels ignored)."""
    out_ids, out_labels = [], []
    for i, l in zip(ids, labels):
        if i == image_id:
            out_ids += [image_id] * n
            out_labels += [IGNORE] * n
        else:
            out_ids.append(i)
            out_labels.append(l)
    return out_ids, out_labels


def pad_batch(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length (left for generation, right for training): (ids, attention mask)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), value, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for k, r in enumerate(rows):
        sl = slice(n - len(r), n) if left else slice(0, len(r))
        ids[k, sl] = torch.tensor(r, dtype=torch.long)
        mask[k, sl] = 1
    return ids, mask
