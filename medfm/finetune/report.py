"""The report-generation task plug-in: an encoder's tokens -> a BERT decoder writing the report.

Recipe section ``report_generation`` (:class:`ReportConfig`); data: a manifest with an image column and a
text column (``report_generation.text``). ``method`` picks how the encoder adapts (the fine-tuning
methods: ``linear_probe`` = frozen, with its tokens computed once and cached; ``lora``; ``full``...); the
decoder and projector always train, at ``optim.lr``, the encoder at ``encoder_lr_scale`` times it.
Evaluation writes captioning metrics, clinical label agreement and the three baselines for every split,
and ``examples_<split>.html``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from medfm.data import DataError
from medfm.encoders import default_text_model_path
from medfm.evaluate.probe import embed_dataset
from medfm.tasks.report_generation import ReportTask, ReportVocab, decoder_config, evaluate_reports

from .model import FinetunedReporter
from .recipe import TASKS, FinetuneTask


@dataclass
class ReportConfig:
    """``report_generation`` recipe section."""

    text: str = "text"  # manifest column with each image's report
    text_model: str | None = None  # BERT-family decoder initialisation (null: the packaged MiniLM)
    decoder_layers: int = 2  # blocks of the text model kept in the decoder
    vocab_size: int = 4000  # compact output vocabulary from the training reports (0: the whole tokenizer)
    max_length: int = 64  # report tokens in training (references are scored whole)
    label_smoothing: float = 0.1
    encoder_lr_scale: float = 0.1  # encoder learning rate = optim.lr x this
    generation: dict = field(default_factory=lambda: {"num_beams": 3, "max_new_tokens": 60,
                                                      "no_repeat_ngram_size": 3})  # generate() arguments
    eval_batch_size: int = 16
    examples: int = 8  # rows of examples_<split>.html
    meteor: bool = True  # METEOR where Java runs (skipped with a printed reason elsewhere)
    attributes: dict = field(default_factory=dict)  # {column: [values] or {value: [keywords]}}: true value named?
    model_scorers: bool = False  # CheXbert / RadGraph F1 where their packages and weights load (optional)
    study: str | None = None  # manifest column grouping rows into one study (several images, one report)
    max_images: int = 4  # images per study (more are left out; fewer are padded and masked)


class _Tokens(Dataset):
    """Cached encoder tokens and their reports (frozen encoder)."""

    def __init__(self, tokens: torch.Tensor, texts: list[str], masks: torch.Tensor):
        self.tokens, self.texts, self.masks = tokens, texts, masks

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.tokens[i], "token_mask": self.masks[i], "text": self.texts[i]}


class StudyDataset(Dataset):
    """Rows of a manifest dataset grouped by a study column: item ``i`` is one study, ``image`` (V, C,
    *spatial) with its first ``max_images`` images (fewer are padded by repeating the first, so that
    batches stack and a mean over V stays the mean of real images), ``image_mask`` (V,) marking the real
    ones, and the study's ``text`` (its first row's: one report per study). ``records`` are the first row
    of each study (for texts and attribute columns)."""

    def __init__(self, dataset, column: str, max_images: int = 4):
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(dataset.records):
            if column not in r.extra:
                raise DataError(f"{dataset.manifest} line {r.line}: no study column {column!r}")
            groups.setdefault(str(r.extra[column]), []).append(i)
        self.dataset, self.max_images = dataset, max_images
        self.studies = [idx[:max_images] for idx in groups.values()]
        self.records = [dataset.records[idx[0]] for idx in self.studies]
        self.manifest = dataset.manifest
        self.post = getattr(dataset, "post", None)  # re-seeded per sample position by KeyedDataset

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> dict:
        samples = [self.dataset[j] for j in self.studies[i]]
        images = [torch.as_tensor(s["image"]) for s in samples]
        n = len(images)
        images += [images[0]] * (self.max_images - n)
        mask = torch.zeros(self.max_images, dtype=torch.long)
        mask[:n] = 1
        return {"image": torch.stack(images), "image_mask": mask, "text": samples[0]["text"]}


def report_texts(ds) -> list[str]:
    """The reports of a manifest (or study) dataset, without loading images; an empty one is an error
    naming its line."""
    empty = next((r for r in ds.records if not r.text), None)
    if empty is not None:
        raise DataError(f"{ds.manifest} line {empty.line}: empty report text")
    return [r.text for r in ds.records]


def _study_embedding(encoder):
    """``encoder`` on (B, V, C, ...) studies: the mean pooled embedding of their images."""
    def forward(x):
        if x.ndim == encoder.spatial_dims + 3:  # (B, V, C, *spatial)
            return encoder(x.flatten(0, 1)).view(x.shape[0], x.shape[1], -1).mean(1)
        return encoder(x)

    return forward


@TASKS.register
class ReportGeneration(FinetuneTask):
    name = "report_generation"
    Config = ReportConfig
    model_class = FinetunedReporter
    keys = ("image", "image_mask", "text", "tokens", "token_mask")

    def validate(self, cfg: dict) -> None:
        if cfg["shots"]:
            raise ValueError("shots (few-shot sampling) applies to classification")

    def split_args(self, cfg: dict, path: str) -> dict:
        if path.lower().endswith(".npz"):
            raise ValueError(f"{path}: report generation needs a manifest with a text column, not an npz")
        return {"text_key": cfg["report_generation"]["text"]}

    def open_split(self, cfg: dict, split: str | None, train: bool = False, path: str | None = None):
        """One split; with ``report_generation.study`` its rows grouped into studies."""
        ds = super().open_split(cfg, split, train=train, path=path)
        c = self.config(cfg)
        return StudyDataset(ds, c.study, c.max_images) if c.study else ds

    def prepare(self, cfg: dict, train):
        c = self.config(cfg)
        self.train_texts = report_texts(train)
        tokenizer = AutoTokenizer.from_pretrained(str(c.text_model or default_text_model_path()))
        self.vocab = ReportVocab.build(tokenizer, self.train_texts, c.vocab_size) if c.vocab_size else None
        return cfg, train

    def head(self, cfg: dict) -> dict:
        c = self.config(cfg)
        vocab = getattr(self, "vocab", None)
        return {"text_model": c.text_model, "max_length": c.max_length, "label_smoothing": c.label_smoothing,
                "generation": dict(c.generation),
                "decoder_config": decoder_config(c.text_model, c.decoder_layers, len(vocab) if vocab else None),
                "vocab": vocab.ids if vocab else None, "unk_id": vocab.unk_id if vocab else None}

    def optim(self, cfg: dict) -> dict:
        return dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"])

    def module(self, cfg: dict, model, train):
        return ReportTask(model, self.config(cfg).encoder_lr_scale, frozen_encoder=cfg["method"] == "linear_probe",
                          **self.optim(cfg))

    def training_set(self, cfg: dict, model, train):
        if cfg["method"] != "linear_probe":
            return train
        # frozen encoder: its tokens are computed once, the projector and decoder train on them
        plain = self.open_split(cfg, cfg["data"]["train_split"], train=False)
        bs, tokens, masks = self.config(cfg).eval_batch_size, [], []
        model.encoder.eval()
        with torch.no_grad():
            for i in tqdm(range(0, len(plain), bs), unit="batch",
                          desc=f"linear_probe: encoding the {len(plain)} training images once (frozen encoder)"):
                items = [plain[j] for j in range(i, min(i + bs, len(plain)))]
                x = torch.stack([torch.as_tensor(s["image"]) for s in items])
                mask = torch.stack([s["image_mask"] for s in items]) if "image_mask" in items[0] else None
                t, m = model.encode_tokens(x, mask)
                tokens.append(t.float())
                masks.append(m)
        return _Tokens(torch.cat(tokens), self.train_texts, torch.cat(masks))

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        c = self.config(cfg)
        if "train_texts" not in state:  # the baselines' pool: the training reports and their image features
            train = self.open_split(cfg, cfg["data"]["train_split"], train=False)
            state["train_texts"] = report_texts(train)
            state["train_features"] = embed_dataset(model.encoder, train, c.eval_batch_size,
                                                    progress="embedding training images",
                                                    forward=_study_embedding(model.encoder))[0]
        attributes = {col: ([str(r.extra.get(col, "")) for r in ds.records], values) for col, values in c.attributes.items()}
        return evaluate_reports(model, ds, out, split, state["train_texts"], state["train_features"],
                                batch_size=c.eval_batch_size, examples=c.examples, meteor=c.meteor, seed=cfg["seed"],
                                attributes=attributes, embed=_study_embedding(model.encoder),
                                model_scorers=c.model_scorers, **c.generation)

    def summary(self, metrics: dict) -> list[str]:
        lines = super().summary(metrics)
        for split, v in metrics.items():
            if isinstance(v, dict) and "model" in v:
                lines.append(f"  {split} (n={v['n']}):")
                for name, m in v.items():
                    if isinstance(m, dict):
                        scores = "  ".join(f"{k} {m[k]:.3f}" for k in ("bleu_1", "bleu_4", "rouge_l", "cider", "meteor")
                                           if k in m)
                        named = "".join(f"  {a} {s['accuracy']:.3f}" for a, s in m.get("attributes", {}).items())
                        lines.append(f"    {name:<26} {scores}  clinical micro-F1 {m['clinical']['micro']['f1']:.3f}{named}")
        return lines
