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
from pathlib import Path

import torch
from torch.utils.data import Dataset

from medfm.atomic import write_json
from medfm.training import StepData, TrainingModule


def report_texts(path: str | None = None, text_key: str | None = None) -> list[str]:
    """The corpus: the IU X-ray reports (``path`` None or ``"iu_xray"``; findings + impression, cleaned),
    or the ``text_key`` column of a CSV/JSONL manifest (rows with empty text are skipped)."""
    from medfm.data.reports import clean_text, read_iu_xray

    if path in (None, "iu_xray"):
        texts = [r.text() for r in read_iu_xray()]
    else:
        from medfm.data import DataError, read_rows

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


class _Keyed(Dataset):
    """``(index, position)`` -> tokenised text (the position travels along to seed the masking)."""

    def __init__(self, encodings: list[dict]):
        self.encodings = encodings

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, key):
        index, position = key
        return {**self.encodings[index], "position": position}


class SeededMasking:
    """transformers' MLM collator, its generator re-seeded from each batch's first position: a resumed run
    masks exactly what the uninterrupted one would have."""

    def __init__(self, collator, seed: int):
        self.collator, self.seed = collator, seed

    def __call__(self, items: list[dict]) -> dict:
        first = min(int(it.pop("position")) for it in items)
        self.collator.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + first)
        return self.collator(items)


class _TextTower:
    """What the run exports as ``encoder/``: the encoder without the MLM head, with its tokenizer."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def named_parameters(self):
        return self.model.named_parameters()

    def save_pretrained(self, folder) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)


class TextMLMModule(TrainingModule):
    """Masked-language-model training of a Hugging Face encoder (the packaged MiniLM by default)."""

    def __init__(self, text_model: str | None = None, **optim):
        import transformers
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from medfm.encoders.text import default_text_model_path

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
    def encoder(self) -> _TextTower:
        return _TextTower(self.model.base_model, self.tokenizer)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.model(**batch).loss, {}


def make_collator(tokenizer, mlm_probability: float, seed: int):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)


@torch.no_grad()
def masked_perplexity(model, tokenizer, texts: list[str], max_length: int = 128, mlm_probability: float = 0.15,
                      seed: int = 0, batch_size: int = 64) -> float:
    """exp(mean cross-entropy over masked tokens) on ``texts`` with a fixed masking (same ``seed`` -> the
    same masked positions and replacements for every model sharing the tokenizer)."""
    collator = make_collator(tokenizer, mlm_probability, seed)
    collator.generator = torch.Generator().manual_seed(seed)
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


def run_text_mlm(cfg: dict, out: str | os.PathLike, resume: bool = False, callbacks=()) -> Path:
    """Continued MLM pretraining as the recipe says (``method: text_mlm``); returns the run folder."""
    import lightning as L
    import yaml

    from medfm.training import make_trainer, prepare_run_folder

    from .callbacks import FinishRun, save_encoder_atomically

    out = Path(out)
    ckpt = prepare_run_folder(out, resume)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    t, d = dict(cfg["text_mlm"]), cfg["data"]
    max_length, p = t.get("max_length", 128), t.get("mlm_probability", 0.15)
    train, held = split_holdout(report_texts(d["path"], d["text"]), t.get("holdout_every", 10))
    optim = dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"])
    module = TextMLMModule(t.get("text_model"), **optim)
    tok = module.tokenizer
    keyed = _Keyed(tokenize(tok, train, max_length))
    data = StepData(keyed, len(keyed), d["batch_size"], d["num_workers"], seed=cfg["seed"],
                    collate_fn=SeededMasking(make_collator(tok, p, cfg["seed"]), cfg["seed"]))
    trainer = make_trainer(cfg["trainer"], out, [*callbacks, FinishRun(out, figure_samples=0)])
    metrics_path = out / "metrics.json"
    if trainer.is_global_zero:
        with open(out / "recipe.yaml", "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        if not ckpt:  # a fresh run measures the unadapted model (a resumed one keeps that number)
            before = masked_perplexity(module.model, tok, held, max_length, p) if held else None
            write_json(metrics_path, {"train_texts": len(train), "heldout_texts": len(held),
                                      "heldout_perplexity_before": before})
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.is_global_zero:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        metrics["heldout_perplexity_after"] = masked_perplexity(module.model, tok, held, max_length, p) if held else None
        save_encoder_atomically(_TextTower(module.model, tok), out / "mlm")
        write_json(metrics_path, metrics)
    return out
