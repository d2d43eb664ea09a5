"""Domain adaptation of the text tower: continued masked-language-model pretraining on report text.

As the domain-specific pretraining papers do (BioBERT, PubMedBERT, CXR-BERT), the
text encoder keeps training with BERT's objective on in-domain text: 15 % of the
tokens are selected, 80 % of those replaced by ``[MASK]``, 10 % by a random token,
10 % kept, and the model predicts the originals (transformers'
``DataCollatorForLanguageModeling``). The default corpus is the IU X-ray reports
(findings + impression) with every ``holdout_every``-th report held out for the
masked-token perplexity that ``metrics.json`` reports before and after.

all-MiniLM-L6-v2 was distilled for sentence embeddings and ships without BERT's
MLM head: ``AutoModelForMaskedLM`` adds one (its decoder tied to the word
embeddings, its transform freshly initialised), so the *unadapted* perplexity is
that of an untrained head on MiniLM's features.

The run folder holds ``encoder/`` (the adapted encoder and its tokenizer, Hugging Face
format; use it as ``clip.text_model``), ``mlm/`` (encoder + MLM head) and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

from medfm import atomic
from medfm.atomic import write_json
from medfm.data import DataError, read_rows
from medfm.data.reports import clean_text, read_iu_xray
from medfm.encoders import TextEncoder, default_text_model_path
from medfm.run import Built, KeyedDataset, RunFolder, StepData, TrainingModule

from .method import PretrainMethod, optim_args
from .registry import register_method


def report_texts(path: str | None = None, text_key: str | None = None) -> list[str]:
    """The corpus: the IU X-ray reports (``path`` None or ``"iu_xray"``; findings + impression, cleaned),
    or the ``text_key`` column of a CSV/JSONL manifest (rows with empty text are skipped)."""
    if path in (None, "iu_xray"):
        texts = [r.text() for r in read_iu_xray()]
    else:
        if not text_key:
            raise ValueError("text MLM on a manifest needs data.text (the column holding the text)")
        rows = read_rows(path)
        if rows and text_key not in rows[0][1]:
            raise DataError(f"{path}: no column {text_key!r} (columns: {', '.join(rows[0][1])})")
        texts = [clean_text(row.get(text_key), lower=False) for _, row in rows]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{path or 'IU X-ray reports'}: no text to train on")
    return texts


def split_holdout(texts: list[str], every: int) -> tuple[list[str], list[str]]:
    """Every ``every``-th text held out (deterministic): (train, held out)."""
    held = [t for i, t in enumerate(texts) if every and i % every == every - 1]
    train = [t for i, t in enumerate(texts) if not every or i % every != every - 1]
    return train, held


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """One dict of token lists per text (truncated, unpadded): what the MLM collator takes."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc} for i in range(len(texts))]


def seed_collator(collator, seed: int) -> None:
    """Give the collator its own generator at ``seed``. transformers >= 5 replaces a generator it did not make
    in this process (``_generator_pid``) with one from the collator's fixed seed, which would mask every
    batch alike after a resume; marking it as this process's keeps ours."""
    collator.generator = torch.Generator().manual_seed(seed)
    if hasattr(collator, "_generator_pid"):
        collator._generator_pid = os.getpid()


class SeededMasking:
    """transformers' MLM collator, its generator re-seeded from each batch's first position: a resumed run
    masks exactly what the uninterrupted one would have."""

    def __init__(self, collator, seed: int):
        self.collator, self.seed = collator, seed

    def __call__(self, items: list[dict]) -> dict:
        first = min(int(it.pop("position")) for it in items)
        seed_collator(self.collator, self.seed * 1_000_003 + first)
        return self.collator(items)


@dataclass
class TextMLMConfig:
    """``text_mlm`` recipe section."""

    text_model: str | None = None  # Hugging Face id or folder (null: the packaged MiniLM)
    max_length: int = 128  # tokens per text
    mlm_probability: float = 0.15  # BERT's masking rate
    holdout_every: int = 10  # every N-th text held out for the perplexity in metrics.json (0: none)


class TextMLMModule(TrainingModule):
    """Masked-language-model training of a Hugging Face encoder (the packaged MiniLM by default)."""

    def __init__(self, text_model: str | None = None, **optim):
        super().__init__(**optim)
        path = str(text_model or default_text_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the missing MLM head is expected (module docstring)
        try:
            self.model = AutoModelForMaskedLM.from_pretrained(path)
        finally:
            transformers.logging.set_verbosity(level)
        self.model.train()  # from_pretrained returns eval mode; BERT trains with dropout

    @property
    def encoder(self) -> nn.Module:
        return self.model.base_model

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.model(**batch).loss, {}


def make_collator(tokenizer, mlm_probability: float, seed: int):
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)


@torch.no_grad()
def masked_perplexity(model, tokenizer, texts: list[str], max_length: int = 128, mlm_probability: float = 0.15,
                      seed: int = 0, batch_size: int = 64) -> float:
    """exp(mean cross-entropy over masked tokens) on ``texts`` with a fixed masking (same ``seed`` -> the
    same masked positions and replacements for every model sharing the tokenizer)."""
    collator = make_collator(tokenizer, mlm_probability, seed)
    seed_collator(collator, seed)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(texts), batch_size):
            batch = collator(tokenize(tokenizer, texts[i:i + batch_size], max_length))
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum",
                                                     ignore_index=-100)
            total += float(loss)
            count += int((labels != -100).sum())
    finally:
        model.train(was)
    return math.exp(total / max(count, 1))


@register_method
class TextMLM(PretrainMethod):
    """``method: text_mlm``: continued MLM on text (``data.path``: a manifest with ``data.text``, or null /
    ``iu_xray`` for the IU X-ray reports). No image encoder, views or probe. Exports ``encoder/`` (the
    adapted text tower: a :class:`medfm.encoders.TextEncoder` folder, also a Hugging Face folder; use it
    as ``clip.text_model``), ``mlm/`` (encoder + MLM head, Hugging Face format) and ``metrics.json``
    (held-out masked-token perplexity before and after)."""

    name = "text_mlm"
    evaluate_options = ("data", "text", "out")  # masked-token perplexity
    Config = TextMLMConfig
    module_class = TextMLMModule

    def build(self, cfg: dict, folder: RunFolder) -> Built:
        t, d = self.config(cfg), self.section(cfg, "data")
        train_texts, held = split_holdout(report_texts(d.path, d.text), t.holdout_every)
        module = TextMLMModule(t.text_model, **optim_args(cfg))
        tok = module.tokenizer
        keyed = KeyedDataset(tokenize(tok, train_texts, t.max_length), seed=cfg["seed"], position_key="position")
        data = StepData(keyed, len(keyed), d.batch_size, d.num_workers, seed=cfg["seed"],
                        collate_fn=SeededMasking(make_collator(tok, t.mlm_probability, cfg["seed"]), cfg["seed"]))
        return Built(module, data, cfg=cfg, state={"t": t, "train_texts": train_texts, "held": held})

    @staticmethod
    def _perplexity(module, state: dict) -> float | None:
        t = state["t"]
        if not state["held"]:
            return None
        return masked_perplexity(module.model, module.tokenizer, state["held"], t.max_length, t.mlm_probability)

    def before_fit(self, built: Built, folder: RunFolder, resumed: bool) -> None:
        if not resumed:  # a fresh run measures the unadapted model (a resumed one keeps that number)
            s = built.state
            write_json(folder / "metrics.json", {"train_texts": len(s["train_texts"]), "heldout_texts": len(s["held"]),
                                                 "heldout_perplexity_before": self._perplexity(built.module, s)})

    def export(self, module, folder: RunFolder, trainer, built: Built) -> None:
        tower = TextEncoder.from_parts(module.model.base_model, module.tokenizer, max_length=built.state["t"].max_length)
        folder.save(tower, "encoder")

    def after_fit(self, built: Built, trainer, folder: RunFolder) -> None:
        path = folder / "metrics.json"
        metrics = json.loads(path.read_text()) if path.exists() else {}
        metrics["heldout_perplexity_after"] = self._perplexity(built.module, built.state)
        with atomic.atomic_folder(folder / "mlm") as tmp:
            built.module.model.save_pretrained(tmp, safe_serialization=True)
            built.module.tokenizer.save_pretrained(tmp)
        write_json(path, metrics)

    def evaluate(self, run: Path, data: str | None = None, text: str | None = None, out: str | None = None) -> dict:
        """Masked-token perplexity of the adapted model (``RUN/mlm``) on ``data``'s texts (default: the
        IU X-ray reports)."""
        cfg = RunFolder(run).read_recipe()
        t = TextMLMConfig(**cfg["text_mlm"])
        model, tok = AutoModelForMaskedLM.from_pretrained(run / "mlm"), AutoTokenizer.from_pretrained(run / "mlm")
        texts = report_texts(data, text)
        metrics = {"run": str(run), "data": str(data or "iu_xray"), "texts": len(texts),
                   "masked_perplexity": masked_perplexity(model, tok, texts, t.max_length, t.mlm_probability)}
        dest = Path(out) if out else run / "eval"
        dest.mkdir(parents=True, exist_ok=True)
        write_json(dest / "metrics.json", metrics)
        return metrics
