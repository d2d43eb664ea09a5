"""The report-generation task: encoder tokens -> projector -> transformer decoder with cross-attention, in one
module: recipe section, model, training module, metrics and evaluation, plug-in.

Any medfm encoder (2D image or 3D volume; several images per study) gives tokens: a ViT's
``forward_features`` (class token + patch tokens), a CNN's last feature map flattened. A LayerNorm + linear
projector maps them to the decoder's width, and the decoder attends to them through cross-attention while
it writes the report left to right.

The default decoder is transformers' ``BertLMHeadModel(is_decoder=True, add_cross_attention=True)``
warm-started from the packaged all-MiniLM-L6-v2 body (its first ``num_layers`` blocks). MiniLM ships no
language-model head and no cross-attention, so those weights start random: :func:`build_decoder` lists
them in a warning. A BERT trained with an MLM head (``medfm pretrain encoders/text_mlm_reports.yaml``'s
``mlm/`` folder: MiniLM adapted to report text) brings its head too: pass it as ``text_model``. The 30k-token output layer dominates the CPU time of a small decoder, so the
vocabulary can be restricted to the training reports' tokens (:class:`ReportVocab`: the ``max_size``
most frequent, plus the special tokens), mapped back to the tokenizer's ids for decoding; the word
embeddings of those tokens are kept. Decoding is ``generate()``: greedy, beam search, sampling,
``no_repeat_ngram_size``, length limits (with transformers 5's encoder-decoder cache for this setup).

Recipe section ``report_generation`` (:class:`ReportConfig`); data: a manifest with an image column and a
text column (``report_generation.text``). ``method`` picks how the encoder adapts (the fine-tuning
methods: ``linear_probe`` = frozen, with its tokens computed once and cached; ``lora``; ``full``...); the
decoder and projector always train, at ``optim.lr``, the encoder at ``encoder_lr_scale`` times it.
Evaluation writes captioning metrics, clinical label agreement and the three baselines for every split, the
number of distinct reports and the model's image sensitivity (its reports with blank and with shuffled images),
and ``examples_<split>.html``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import AutoTokenizer, BertLMHeadModel

from medfm.data import DataError
from medfm.encoders import default_text_model_path
from medfm.evaluate.changed_images import ChangedImages, changed_share
from medfm.evaluate.probe import embed_dataset, sample_batches
from medfm.evaluate.report_baselines import most_common_report, nearest_neighbour_reports, random_reports
from medfm.evaluate.report_labeler import clinical_agreement
from medfm.evaluate.report_metrics import caption_metrics, mention_scores, model_based_scores, tokenize_report
from medfm.evaluate.report_table import examples_html
from medfm.run import TrainingModule, evaluating

from medfm.heads import FrozenEncoder, TaskModel, TextWriter, build_task_encoder, encoder_tokens, known_cross_entropy
from medfm.heads.text_writer import ReportVocab, writer_head, writer_parts

from .base import FinetuneTask
from .registry import TASKS

class ReportGenerator(TaskModel, TextWriter, nn.Module):
    """``encoder`` -> projector -> ``decoder`` (a BERT LM head model with cross-attention) + its tokenizer.

    ``images``: (B, C, *spatial), or (B, V, C, *spatial) for V images per study with ``image_mask``
    (B, V) marking the real ones. Texts are written between the tokenizer's start (``[CLS]``) and end
    (``[SEP]``) tokens, in compact ids when ``vocab`` is given.

    Built by a run from its spec (:meth:`from_spec`), it saves and reloads as an artifact
    (:class:`medfm.finetune.base.TaskModel`): ``config.json`` (the spec, with the decoder's BERT config and the
    compact vocabulary), ``model.safetensors`` (encoder, projector, decoder) and ``tokenizer/``.
    """

    components = ("tokenizer",)

    def __init__(self, encoder: nn.Module, decoder: BertLMHeadModel, tokenizer, vocab: ReportVocab | None = None,
                 max_length: int = 64, label_smoothing: float = 0.0, prompts: dict[str, list[str]] | None = None):
        super().__init__()
        self.encoder = encoder
        dim, width = encoder.embed_dim, decoder.config.hidden_size
        self.projector = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.init_writer(decoder, tokenizer, vocab, max_length, label_smoothing)
        # attribute prompts (PromptMRG's idea): a head per attribute on the pooled image tokens; its prediction,
        # as a mix of learned value embeddings, is one more memory token the decoder attends to
        self.prompts = {str(k): list(v) for k, v in (prompts or {}).items()}
        self.attribute_heads = nn.ModuleDict({f"a{i}": nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, len(v)))
                                              for i, v in enumerate(self.prompts.values())})
        self.attribute_values = nn.ParameterDict({f"a{i}": nn.Parameter(torch.randn(len(v), width) * 0.02)
                                                  for i, v in enumerate(self.prompts.values())})

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "ReportGenerator":
        h = spec["head"]
        decoder, tokenizer, vocab = writer_parts(h, pretrained, folder)
        model = cls(build_task_encoder(spec, pretrained), decoder, tokenizer, vocab, max_length=h["max_length"],
                    label_smoothing=h["label_smoothing"], prompts=h.get("prompts"))
        model.spec = spec
        return model

    # ------------------------------------------------------------ encoder side
    def encode_tokens(self, images: torch.Tensor, image_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens (B, T, D) before the projector, and their mask (B, T): a study's images' tokens
        concatenated, those of padding images masked out (what a frozen encoder's cache holds)."""
        study = images.ndim == self.encoder.spatial_dims + 3
        b = images.shape[0]
        tokens = encoder_tokens(self.encoder, images.flatten(0, 1) if study else images)
        n = tokens.shape[1]
        tokens = tokens.reshape(b, -1, tokens.shape[-1])
        if image_mask is None:
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return tokens, image_mask.long().repeat_interleave(n, dim=1)

    def encode(self, images: torch.Tensor, image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder memory (B, T (+ attribute prompts), H) and its attention mask."""
        return self.prompted_memory(*self.encode_tokens(images, image_mask))[:2]

    def prompted_memory(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                        attributes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Decoder memory from encoder tokens, with one prompt token per attribute appended (when the model
        has attribute heads), and the heads' logits. A prompt token is the value embeddings weighted by the
        head's predicted probabilities or, where ``attributes`` (B, A; -100 unknown) gives the true value
        (teacher forcing in training), by its one-hot."""
        memory, mask = self.project(tokens, mask)
        if not self.prompts:
            return memory, mask, []
        weight = mask.unsqueeze(-1).float()
        pooled = (tokens.float() * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        logits, extra = [], []
        for j, key in enumerate(self.attribute_heads):
            out = self.attribute_heads[key](pooled)
            p = out.softmax(-1)
            if attributes is not None:
                truth = attributes[:, j].to(out.device)
                p = torch.where((truth >= 0)[:, None], F.one_hot(truth.clamp(min=0), out.shape[-1]).float(), p)
            logits.append(out)
            extra.append(p @ self.attribute_values[key])
        ones = torch.ones(mask.shape[0], len(extra), dtype=mask.dtype, device=mask.device)
        return torch.cat([memory, torch.stack(extra, 1)], 1), torch.cat([mask, ones], 1), logits

    @torch.no_grad()
    def predict_attributes(self, images: torch.Tensor, image_mask: torch.Tensor | None = None) -> dict[str, list[str]]:
        """Each attribute head's predicted value for a batch of images (or studies)."""
        with evaluating(self):
            logits = self.prompted_memory(*self.encode_tokens(images, image_mask))[2]
        return {name: [values[i] for i in out.argmax(-1).tolist()]
                for (name, values), out in zip(self.prompts.items(), logits)}

    def project(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder tokens (B, T, D) -> decoder memory (B, T, H) and its mask (cached tokens start here)."""
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return self.projector(tokens.float()), mask.long()

    def forward(self, images: torch.Tensor, texts: Sequence[str], image_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss(*self.encode(images, image_mask), texts)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, image_mask: torch.Tensor | None = None, **kwargs) -> list[str]:
        """Reports for a batch of images (or studies); see :meth:`generate_from_memory`."""
        with evaluating(self):
            return self.generate_from_memory(*self.encode(images, image_mask), **kwargs)


# --------------------------------------------------------------------------- training
class ReportModule(FrozenEncoder, TrainingModule):
    """Lightning module: teacher forcing on ``image`` (or cached ``tokens``) + ``text`` batches; the
    encoder learns at ``encoder_lr_scale`` times the learning rate of the projector and decoder."""

    def __init__(self, model: ReportGenerator, encoder_lr_scale: float = 0.1, frozen_encoder: bool = False,
                 attribute_weight: float = 1.0, **optim):
        super().__init__(**optim)
        self.model, self.encoder_lr_scale, self.frozen_encoder = model, encoder_lr_scale, frozen_encoder
        self.attribute_weight = attribute_weight

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        enc = {id(p) for p in self.model.encoder.parameters()}
        out = []
        for g in groups:  # split each weight-decay group into encoder and decoder parts
            for is_enc in (True, False):
                params = [p for p in g["params"] if (id(p) in enc) == is_enc]
                if params:
                    scale = self.encoder_lr_scale if is_enc else 1.0
                    out.append({**g, "params": params, "lr": self.lr * scale, "lr_scale": scale})
        return out

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if "tokens" in batch:
            tokens, mask = batch["tokens"], batch.get("token_mask")
        else:
            tokens, mask = self.model.encode_tokens(batch["image"], batch.get("image_mask"))
        attributes = batch.get("attributes")
        memory, memory_mask, logits = self.model.prompted_memory(tokens, mask, attributes)
        loss = self.model.loss(memory, memory_mask, list(batch["text"]))
        if not logits:
            return loss, {}
        attr = sum(known_cross_entropy(out, attributes[:, j]) for j, out in enumerate(logits))
        return loss + self.attribute_weight * attr, {"report": loss.detach(), "attributes": attr.detach()}


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate_reports(model: ReportGenerator, ds, batch_size: int = 16, progress: str | None = None,
                     **generation) -> tuple[list[str], list[str]]:
    """(generated, reference) reports for every sample of ``ds`` (``image`` + ``text``)."""
    generated, references = [], []
    for items, images in sample_batches(ds, batch_size, next(model.parameters()).device, progress, leave=False):
        generated += model.generate(images, image_mask(items, images.device), **generation)
        references += [s["text"] for s in items]
    return generated, references


def evaluate_reports(model: ReportGenerator, ds, out: Path, split: str, train_texts: Sequence[str],
                     train_features: torch.Tensor | None = None, batch_size: int = 16, examples: int = 8,
                     meteor: bool = True, seed: int = 0, attributes: dict | None = None, embed=None,
                     model_scorers: bool = False, **generation) -> dict:
    """Captioning metrics and clinical label agreement of the model's reports on ``ds`` and of the three
    baselines (most common / random / nearest-neighbour training report); ``attributes`` (``{name: (true
    values per sample, possible values)}``): whether each text names the true value; the number of distinct
    reports of each; the model's image sensitivity (share of its reports that change when the images are
    blank or shuffled, :class:`medfm.evaluate.changed_images.ChangedImages`); ``examples_<split>.html`` with
    the blank / shuffled reports beside the real ones."""
    generated, refs = generate_reports(model, ds, batch_size, progress=f"generating {split} reports", **generation)
    changed = {f"model, {mode} image{'s' if mode == 'shuffled' else ''}": generate_reports(
        model, ChangedImages(ds, mode, seed=seed), batch_size, progress=f"{mode} images", **generation)[0]
        for mode in ("blank", "shuffled")}
    candidates = {"model": generated,
                  "most common report": most_common_report(train_texts, len(refs)),
                  "random report": random_reports(train_texts, len(refs), seed)}
    if train_features is not None:
        query, _ = embed_dataset(model.encoder, ds, batch_size, forward=embed)
        candidates["nearest-neighbour report"] = nearest_neighbour_reports(train_features, train_texts, query)
    results = {}
    for name, texts in candidates.items():
        res = caption_metrics(refs, texts, meteor=meteor)
        res["clinical"] = {k: v for k, v in clinical_agreement(refs, texts).items() if k != "per_label"}
        if model_scorers:  # CheXbert / RadGraph F1 where their packages and weights load
            res["model_based"] = model_based_scores(refs, texts)
        if attributes:
            res["attributes"] = {a: mention_scores(texts, truth, values) for a, (truth, values) in attributes.items()}
        res["distinct_reports"] = len(set(tokenize_report(t) for t in texts))
        results[name] = res
    results["model"]["image_sensitivity"] = {k: changed_share(generated, v, tokenize_report) for k, v in changed.items()}
    shown = list(range(min(examples, len(ds))))
    images = [ds[i]["image"] for i in shown]  # a study shows its first image
    examples_html([x[0] if x.ndim == model.encoder.spatial_dims + 2 else x for x in images],
                  {"reference": [refs[i] for i in shown],
                   **{k: [v[i] for i in shown] for k, v in {**candidates, **changed}.items()}},
                  out / f"examples_{split}.html", title=f"{split}: generated reports and baselines")
    return {"n": len(refs), **results}


# ----------------------------------------------------------------- the plug-in
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
    prompt_attributes: list = field(default_factory=list)  # manifest columns predicted from the image, prompting the decoder
    attribute_weight: float = 1.0  # loss = report CE + this x the attribute heads' CE


class _Tokens(Dataset):
    """Cached encoder tokens and their reports (frozen encoder), with their attribute labels when prompted."""

    def __init__(self, tokens: torch.Tensor, texts: list[str], masks: torch.Tensor, attributes: torch.Tensor | None = None):
        self.tokens, self.texts, self.masks, self.attributes = tokens, texts, masks, attributes

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        item = {"tokens": self.tokens[i], "token_mask": self.masks[i], "text": self.texts[i]}
        if self.attributes is not None:
            item["attributes"] = self.attributes[i]
        return item


def attribute_labels(ds, prompts: dict[str, list[str]]) -> torch.Tensor:
    """(N, A) indices of each row's (study's first row's) value of each prompted attribute; -100 where the
    value is empty or unseen in training (no loss, the head's prediction prompts the decoder)."""
    index = [{v: i for i, v in enumerate(values)} for values in prompts.values()]
    return torch.tensor([[index[j].get(str(r.extra.get(col, "")).strip(), -100) for j, col in enumerate(prompts)]
                         for r in ds.records], dtype=torch.long)


class WithAttributes(Dataset):
    """A report dataset whose items also carry ``attributes`` (:func:`attribute_labels`)."""

    def __init__(self, ds, prompts: dict[str, list[str]]):
        self.ds, self.labels = ds, attribute_labels(ds, prompts)
        self.records, self.manifest, self.post = ds.records, ds.manifest, getattr(ds, "post", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "attributes": self.labels[i]}


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


@torch.no_grad()
def attribute_head_accuracy(model: ReportGenerator, ds, batch_size: int = 16) -> dict[str, dict]:
    """Accuracy of each attribute head on the rows of ``ds`` whose value was seen in training."""
    truth = attribute_labels(ds, model.prompts)
    predicted: dict[str, list[str]] = {k: [] for k in model.prompts}
    for items, images in sample_batches(ds, batch_size, next(model.parameters()).device):
        for k, v in model.predict_attributes(images, image_mask(items, images.device)).items():
            predicted[k] += v
    out = {}
    for j, (name, values) in enumerate(model.prompts.items()):
        known = [i for i in range(len(ds)) if truth[i, j] >= 0]
        hits = sum(predicted[name][i] == values[truth[i, j]] for i in known)
        out[name] = {"n": len(known), "accuracy": hits / len(known) if known else float("nan")}
    return out


def image_mask(items: Sequence[dict], device) -> torch.Tensor | None:
    """The (B, V) mask of a batch of studies (:class:`StudyDataset` items), None for single images."""
    return torch.stack([s["image_mask"] for s in items]).to(device) if "image_mask" in items[0] else None


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
class ReportGenerationTask(FinetuneTask):
    name = "report_generation"
    Config = ReportConfig
    model_class = ReportGenerator
    keys = ("image", "image_mask", "text", "tokens", "token_mask", "attributes")

    def split_args(self, cfg: dict, path: str) -> dict:
        if path.lower().endswith(".npz"):
            raise ValueError(f"{path}: report generation needs a manifest with a text column, not an npz")
        return {"text_key": self.config(cfg).text}

    def open_split(self, cfg: dict, split: str | None, train: bool = False, path: str | None = None):
        """One split; with ``report_generation.study`` its rows grouped into studies."""
        ds = super().open_split(cfg, split, train=train, path=path)
        c = self.config(cfg)
        return StudyDataset(ds, c.study, c.max_images) if c.study else ds

    def prepare(self, cfg: dict, train, state: dict):
        """The training reports (``state["train_texts"]``) and the compact vocabulary built from them."""
        c = self.config(cfg)
        state["train_texts"] = report_texts(train)
        tokenizer = AutoTokenizer.from_pretrained(str(c.text_model or default_text_model_path()))
        state["vocab"] = ReportVocab.build(tokenizer, state["train_texts"], c.vocab_size) if c.vocab_size else None
        state["prompts"] = {}
        for col in c.prompt_attributes:  # the values seen in training, sorted
            if not any(col in r.extra for r in train.records):
                raise DataError(f"{train.manifest}: no column {col!r} (report_generation.prompt_attributes)")
            state["prompts"][col] = sorted({str(r.extra.get(col, "")).strip() for r in train.records} - {""})
        return cfg, train

    def head(self, cfg: dict, state: dict) -> dict:
        c = self.config(cfg)
        return {**writer_head(c.text_model, c.decoder_layers, state.get("vocab"), c.max_length, c.label_smoothing,
                              c.generation), "prompts": state.get("prompts") or {}}

    def optim(self, cfg: dict) -> dict:
        return dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"])

    def module(self, cfg: dict, model, train, state: dict):
        c = self.config(cfg)
        return ReportModule(model, c.encoder_lr_scale, frozen_encoder=self.frozen_encoder(cfg),
                          attribute_weight=c.attribute_weight, **self.optim(cfg))

    def training_set(self, cfg: dict, model, train, state: dict):
        prompts = state.get("prompts")
        if not self.frozen_encoder(cfg):
            return WithAttributes(train, prompts) if prompts else train
        # frozen encoder: its tokens are computed once, the projector and decoder train on them
        plain = self.open_split(cfg, self.section(cfg, "data").train_split, train=False)
        bs, tokens, masks = self.config(cfg).eval_batch_size, [], []
        model.encoder.eval()
        with torch.no_grad():
            for items, x in sample_batches(plain, bs, unit="batch", progress=f"linear_probe: encoding the "
                                           f"{len(plain)} training images once (frozen encoder)"):
                t, m = model.encode_tokens(x, image_mask(items, x.device))
                tokens.append(t.float())
                masks.append(m)
        return _Tokens(torch.cat(tokens), state["train_texts"], torch.cat(masks),
                       attribute_labels(plain, prompts) if prompts else None)

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        c = self.config(cfg)
        if "train_texts" not in state:  # the baselines' pool: the training reports and their image features
            train = self.open_split(cfg, self.section(cfg, "data").train_split, train=False)
            state["train_texts"] = report_texts(train)
            state["train_features"] = embed_dataset(model.encoder, train, c.eval_batch_size,
                                                    progress="embedding training images",
                                                    forward=_study_embedding(model.encoder))[0]
        attributes = {col: ([str(r.extra.get(col, "")) for r in ds.records], values) for col, values in c.attributes.items()}
        res = evaluate_reports(model, ds, out, split, state["train_texts"], state["train_features"],
                               batch_size=c.eval_batch_size, examples=c.examples, meteor=c.meteor, seed=cfg["seed"],
                               attributes=attributes, embed=_study_embedding(model.encoder),
                               model_scorers=c.model_scorers, **c.generation)
        if model.prompts:
            res["model"]["attribute_heads"] = attribute_head_accuracy(model, ds, c.eval_batch_size)
        return res

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
                        lines.append(f"    {name:<26} {scores}  clinical micro-F1 {m['clinical']['micro']['f1']:.3f}{named}"
                                     + (f"  distinct {m['distinct_reports']}" if "distinct_reports" in m else ""))
                if "image_sensitivity" in v["model"]:
                    lines.append("    image sensitivity (share of the model's reports changed): " + ", ".join(
                        f"{k} {x:.3f}" for k, x in v["model"]["image_sensitivity"].items()))
        return lines
