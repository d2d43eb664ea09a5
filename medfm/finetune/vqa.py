"""The visual question answering task (VQA-RAD style), in one module: recipe section, model, training module,
metrics and evaluation with its baselines, plug-in.

Model (:class:`VQAModel`): the image's tokens (any medfm encoder, 2D or 3D, through the one encoder
interface) are projected to the text width; the question is encoded by the text tower (the packaged MiniLM
by default, its first ``question_layers`` blocks); a small fusion transformer runs over [question tokens;
image tokens] (a type embedding tells them apart). Two answer heads read the fused tokens:

* a classifier over the training answer vocabulary on the question's first ([CLS]) position: closed
  questions, and open questions whose answer is in the vocabulary (the common VQA-RAD protocol);
* open-ended generation: the report decoder (:class:`medfm.finetune.report_generation.TextWriter`, MiniLM
  blocks + cross-attention) writes the answer attending to the fused tokens, so it is prompted with the
  question and the image together.

Honest evaluation (:func:`evaluate_vqa`): beside the model, always, the most common training answer per
question type, a **question-only model** (the same architecture whose image is replaced by a constant,
trained in the same run on the same batches: ``vqa.question_only``), and the model's own answers with
**blank** and **shuffled** images (:class:`medfm.evaluate.changed_images.ChangedImages`); image sensitivity = the share of answers that
change. ``examples_<split>.html`` shows questions, references and every answerer; ``answers_<split>.csv``
every prediction; ``accuracy_<split>.png`` the closed / open accuracy of each.

Data: a manifest with one row per question: ``image``, ``split`` and the columns named in the ``vqa``
section (VQA-RAD: question, answer, answer_type CLOSED/OPEN, question_type, image_organ). Questions on the
same image share one loaded image. Carve a validation split by image (``medfm data prepare vqa_rad`` does;
:func:`medfm.data.prepare.carve_split` for other manifests).
"""

from __future__ import annotations

import csv
import io
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import transformers
from torch.utils.data import Dataset
from transformers import AutoTokenizer

from medfm.atomic import write_text
from medfm.data import DataError
from medfm.encoders import create_text_encoder, default_text_model_path
from medfm.encoders.text import TextEncoder
from medfm.evaluate.changed_images import ChangedImages
from medfm.evaluate.plots import grouped_bars_png
from medfm.evaluate.probe import sample_batches
from medfm.evaluate.report_table import examples_html
from medfm.evaluate.vqa_metrics import image_sensitivity, most_common_answers, normalize_answer, vqa_metrics
from medfm.run import TrainingModule, evaluating

from medfm.heads import FrozenEncoder, TaskModel, build_task_encoder, known_cross_entropy, lr_scaled_groups
from medfm.heads.text_writer import ReportVocab, TextWriter, encoder_tokens, writer_head, writer_parts

from .base import FinetuneTask
from .registry import TASKS

IGNORE = -100  # answer index of a training answer outside the vocabulary: no classifier loss


# --------------------------------------------------------------------------- data
class QADataset(Dataset):
    """One question per item of a manifest dataset (``ds``: a :class:`medfm.data.ManifestDataset`): ``image``
    (the preprocessed image; rows of the same image share one load), ``question``, ``answer`` (as written),
    ``answer_index`` (its index in ``answers``, the model's vocabulary, or -100 outside it). ``records``,
    ``answer_types``, ``question_types`` and ``organs`` are per question, without loading images. A row
    without a question or an answer is an error naming its line."""

    def __init__(self, ds, question: str = "question", answer: str = "answer", answer_type: str = "answer_type",
                 question_type: str | None = "question_type", organ: str | None = "image_organ"):
        self.dataset, self.records, self.manifest = ds, ds.records, ds.manifest
        self.post = getattr(ds, "post", None)  # re-seeded per sample position by KeyedDataset
        first: dict[str, int] = {}
        self.first = [first.setdefault(str(r.image), i) for i, r in enumerate(ds.records)]
        self.image_keys = [str(r.image) for r in ds.records]
        cols = {"question": question, "answer": answer, "answer_type": answer_type}
        for r in ds.records:
            for what, col in cols.items():
                if not str(r.extra.get(col, "")).strip():
                    has = "an empty" if col in r.extra else "no"
                    raise DataError(f"{ds.manifest} line {r.line}: {has} {what} (column {col!r})")
        self.questions = [str(r.extra[question]).strip() for r in ds.records]
        self.answer_texts = [str(r.extra[answer]).strip() for r in ds.records]
        self.answer_types = [str(r.extra[answer_type]).strip().upper() for r in ds.records]
        self.question_types = [str(r.extra.get(question_type, "")) if question_type else "" for r in ds.records]
        self.organs = [str(r.extra.get(organ, "")) if organ else "" for r in ds.records]
        self.answers: list[str] = []
        self._index: dict[str, int] = {}

    def set_answers(self, answers: Sequence[str]) -> None:
        """The model's answer vocabulary (normalised answers), which ``answer_index`` refers to."""
        self.answers = list(answers)
        self._index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[self.first[i]]
        return {"image": sample["image"], "question": self.questions[i], "answer": self.answer_texts[i],
                "answer_index": self._index.get(normalize_answer(self.answer_texts[i]), IGNORE)}


# --------------------------------------------------------------------------- model
def question_config(text_model: str | None, layers: int) -> dict:
    """The question tower's Hugging Face config, cut to ``layers`` blocks (the spec keeps it for reloading)."""
    base = transformers.AutoConfig.from_pretrained(str(text_model or default_text_model_path()))
    if not 1 <= layers <= base.num_hidden_layers:
        raise ValueError(f"vqa.question_layers must be 1..{base.num_hidden_layers} for {text_model or 'MiniLM'}")
    cfg = base.to_dict()
    cfg["num_hidden_layers"] = layers
    for key in ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    return cfg


def question_tower(head: dict, tokenizer, pretrained: bool) -> TextEncoder:
    """The text tower that encodes questions: the text model's first blocks (pretrained) or, on reload, the
    same architecture from the saved config (its weights come from ``model.safetensors``)."""
    config = head["question_config"]
    if pretrained:
        tower = create_text_encoder(head["text_model"], max_length=head["max_length"], pooling="cls")
        tower.model.encoder.layer = tower.model.encoder.layer[: config["num_hidden_layers"]]
        tower.model.config.num_hidden_layers = config["num_hidden_layers"]
        return tower
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**config))
    return TextEncoder.from_parts(model, tokenizer, max_length=head["max_length"], pooling="cls")


class VQAModel(TaskModel, TextWriter, nn.Module):
    """Image encoder + question tower + fusion transformer + answer classifier (+ answer decoder).

    ``blind=True`` makes it the question-only baseline: its images are replaced by a constant (zeros) before
    the encoder, the rest is the same architecture. ``question_only``: such a twin trained beside it, saved
    in the same ``model.safetensors`` so that evaluation always has it. Saved and reloaded as a task-model
    artifact (:class:`medfm.finetune.base.TaskModel`): ``config.json`` (the spec: answers, question tower and
    decoder configs), ``model.safetensors``, ``tokenizer/``.
    """

    components = ("tokenizer",)

    def __init__(self, encoder: nn.Module, question: TextEncoder, tokenizer, answers: Sequence[str],
                 fusion_layers: int = 2, decoder: nn.Module | None = None, vocab: ReportVocab | None = None,
                 max_length: int = 24, label_smoothing: float = 0.1, blind: bool = False,
                 question_only: "VQAModel | None" = None):
        super().__init__()
        width = question.embed_dim
        self.encoder, self.question, self.answers, self.blind = encoder, question, list(answers), blind
        self.image_proj = nn.Sequential(nn.LayerNorm(encoder.embed_dim), nn.Linear(encoder.embed_dim, width))
        self.type_embed = nn.Parameter(torch.randn(2, width) * 0.02)  # 0: question token, 1: image token
        layer = nn.TransformerEncoderLayer(width, nhead=max(1, width // 64), dim_feedforward=2 * width, dropout=0.1,
                                           batch_first=True, norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, fusion_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, len(self.answers))
        if decoder is not None:
            self.init_writer(decoder, tokenizer, vocab, max_length, label_smoothing)
        else:
            self.decoder, self.tokenizer, self.label_smoothing = None, tokenizer, label_smoothing
        self.question_only = question_only

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None, blind: bool = False) -> "VQAModel":
        h = spec["head"]
        if h.get("decoder_config"):
            decoder, tokenizer, vocab = writer_parts(h, pretrained, folder, role="answer decoder")
        else:
            decoder, vocab = None, None
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer") if not pretrained
                                                      else str(h["text_model"] or default_text_model_path()))
        twin = None
        if h.get("question_only") and not blind:
            twin = cls.from_spec(spec, pretrained, folder, blind=True)
        model = cls(build_task_encoder(spec, pretrained), question_tower(h, tokenizer, pretrained), tokenizer, h["answers"],
                    h["fusion_layers"], decoder, vocab, h["max_length"], h["label_smoothing"], blind, twin)
        model.spec = spec
        return model

    # ------------------------------------------------------------ forward
    def fuse(self, images: torch.Tensor, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused tokens (B, L + T, W), question first ([CLS] at 0), and their mask (1 = real token)."""
        if self.blind:  # a constant image gives the same tokens for every question: encoded once, then repeated
            images = torch.zeros_like(images[:1])
        image = self.image_proj(encoder_tokens(self.encoder, images).float()) + self.type_embed[1]
        image = image.expand(len(questions), -1, -1)
        q = self.question(list(questions))
        text = q["tokens"] + self.type_embed[0]
        pad = torch.cat([q["attention_mask"] == 0, torch.zeros(image.shape[:2], dtype=torch.bool, device=image.device)], 1)
        fused = self.norm(self.fusion(torch.cat([text, image], 1), src_key_padding_mask=pad))
        return fused, (~pad).long()

    def forward(self, images: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """Answer-vocabulary logits (B, A)."""
        return self.classifier(self.fuse(images, questions)[0][:, 0])

    def vqa_loss(self, images: torch.Tensor, questions: Sequence[str], answer_index: torch.Tensor,
                 answers: Sequence[str], generation_weight: float = 0.5) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the classifier (answers outside the vocabulary ignored) + ``generation_weight`` x
        the decoder's teacher-forced loss on the answer text."""
        fused, mask = self.fuse(images, questions)
        logits = self.classifier(fused[:, 0])
        cls = known_cross_entropy(logits, answer_index, self.label_smoothing)
        logs = {"classifier": cls.detach()}
        loss = cls
        if self.decoder is not None and generation_weight > 0:
            gen = self.loss(fused, mask, [normalize_answer(a) or a for a in answers])
            loss = loss + generation_weight * gen
            logs["generation"] = gen.detach()
        return loss, logs

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: Sequence[str]) -> tuple[list[str], list[float]]:
        """The classifier's answers and their probabilities."""
        with evaluating(self):
            p = self(images, questions).float().softmax(-1)
        score, idx = p.max(-1)
        return [self.answers[i] for i in idx.tolist()], score.tolist()

    @torch.no_grad()
    def generate_answers(self, images: torch.Tensor, questions: Sequence[str], **generation) -> list[str]:
        """Open-ended answers written by the decoder (``generation``: ``generate()`` arguments)."""
        if self.decoder is None:
            raise ValueError("this VQA model has no answer decoder (trained with vqa.generate: false)")
        with evaluating(self):
            return self.generate_from_memory(*self.fuse(images, questions), **generation)


# --------------------------------------------------------------------------- training
class VQAModule(FrozenEncoder, TrainingModule):
    """Lightning module: the model's loss plus, when it has one, its question-only twin's on the same batch;
    encoders learn at ``encoder_lr_scale`` x the LR, question towers at ``text_lr_scale`` x (0: frozen)."""

    def __init__(self, model: VQAModel, encoder_lr_scale: float = 0.1, text_lr_scale: float = 0.1,
                 generation_weight: float = 0.5, frozen_encoder: bool = False, **optim):
        super().__init__(**optim)
        self.model, self.frozen_encoder = model, frozen_encoder
        self.encoder_lr_scale, self.text_lr_scale, self.generation_weight = encoder_lr_scale, text_lr_scale, generation_weight
        if text_lr_scale == 0:  # a frozen question tower: no backward through it, no optimizer state for it
            for m in self.models():
                m.question.requires_grad_(False)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def models(self) -> list[VQAModel]:
        return [self.model] + ([self.model.question_only] if self.model.question_only is not None else [])

    def frozen_parts(self) -> list[nn.Module]:
        """Frozen towers keep their normalisation statistics and no dropout: encoders under a frozen method,
        question towers at ``text_lr_scale: 0``."""
        return [part for m in self.models() for part, frozen in ((m.encoder, self.frozen_encoder),
                                                                 (m.question, self.text_lr_scale == 0)) if frozen]

    def param_groups(self) -> list[dict]:
        scales = {}
        for m in self.models():
            scales.update({id(p): self.encoder_lr_scale for p in m.encoder.parameters()})
            scales.update({id(p): self.text_lr_scale for p in m.question.parameters()})
        return lr_scaled_groups(super().param_groups(), scales, self.lr)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        args = (batch["image"], list(batch["question"]), batch["answer_index"], list(batch["answer"]),
                self.generation_weight)
        loss, logs = self.model.vqa_loss(*args)
        if self.model.question_only is not None:
            blind, _ = self.model.question_only.vqa_loss(*args)
            logs["question_only"] = blind.detach()
            loss = loss + blind
        return loss, logs


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_dataset(model: VQAModel, ds, batch_size: int = 32, generate: dict | None = None,
                   progress: str | None = None) -> dict[str, list]:
    """The classifier's answers and scores for every question of ``ds`` (``image`` + ``question`` items), and
    the decoder's answers when ``generate`` (its ``generate()`` arguments) is given."""
    out: dict[str, list] = {"answers": [], "scores": [], "generated": []}
    for items, images in sample_batches(ds, batch_size, next(model.parameters()).device, progress, leave=False):
        questions = [s["question"] for s in items]
        answers, scores = model.answer(images, questions)
        out["answers"] += answers
        out["scores"] += scores
        if generate is not None:
            out["generated"] += model.generate_answers(images, questions, **generate)
    return out


def evaluate_vqa(model: VQAModel, ds: QADataset, out: Path, split: str, train: QADataset,
                 batch_size: int = 32, generation: dict | None = None, examples: int = 16, seed: int = 0) -> dict:
    """Metrics of the model and every baseline on ``ds`` (see the module docstring), ``answers_<split>.csv``
    and ``examples_<split>.html``."""
    ds.set_answers(model.answers)
    refs = ds.answer_texts
    score = lambda preds: vqa_metrics(preds, refs, ds.answer_types, ds.question_types, ds.organs)  # noqa: E731
    real = answer_dataset(model, ds, batch_size, generation if model.decoder is not None else None,
                          progress=f"answering {split} questions")
    blank = answer_dataset(model, ChangedImages(ds, "blank"), batch_size, progress="blank images")["answers"]
    shuffled_ds = ChangedImages(ds, "shuffled", ds.image_keys, seed)
    shuffled = answer_dataset(model, shuffled_ds, batch_size, progress="shuffled images")["answers"]
    groups = lambda q: [f"{t}/{a}" for t, a in zip(q.question_types, q.answer_types)]  # noqa: E731
    answerers = {"model": real["answers"]}
    if real["generated"]:
        answerers["model, generated answers"] = real["generated"]
    answerers.update({"model, blank images": blank, "model, shuffled images": shuffled,
                      "most common answer per question type": most_common_answers(train.answer_texts, groups(train), groups(ds))})
    sensitivity = {"model, blank images": image_sensitivity(real["answers"], blank),
                   "model, shuffled images": image_sensitivity(real["answers"], shuffled)}
    if model.question_only is not None:
        q_only = answer_dataset(model.question_only, ds, batch_size, progress="question-only model")["answers"]
        answerers["question-only model"] = q_only
        sensitivity["question-only model, shuffled images"] = image_sensitivity(
            q_only, answer_dataset(model.question_only, shuffled_ds, batch_size)["answers"])
    results = {"n": len(ds), **{name: score(preds) for name, preds in answerers.items()},
               "image_sensitivity": sensitivity}
    results["model"]["mean_score"] = sum(real["scores"]) / len(real["scores"])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["question", "answer_type", "question_type", "reference", *answerers, "model_score"])
    for i in range(len(ds)):
        writer.writerow([ds.questions[i], ds.answer_types[i], ds.question_types[i], refs[i],
                         *(v[i] for v in answerers.values()), f"{real['scores'][i]:.4f}"])
    write_text(out / f"answers_{split}.csv", buf.getvalue())
    grouped_bars_png({k: {s.replace("_", " "): v[s] for s in ("closed_accuracy", "open_accuracy") if s in v}
                      for k, v in results.items() if isinstance(v, dict) and "accuracy" in v},
                     out / f"accuracy_{split}.png", title=f"{split}: {len(ds)} questions", ylabel="accuracy")
    shown = _spread(ds, examples, seed)
    examples_html([ds[i]["image"] for i in shown],
                  {"question": [f"{ds.questions[i]} ({ds.answer_types[i].lower()})" for i in shown],
                   "reference": [refs[i] for i in shown],
                   "model": [f"{real['answers'][i]} ({real['scores'][i]:.2f})" for i in shown],
                   **{k: [v[i] for i in shown] for k, v in answerers.items() if k != "model"}},
                  out / f"examples_{split}.html", title=f"{split}: answers of the model and its baselines")
    return results


def _spread(ds: QADataset, n: int, seed: int) -> list[int]:
    """``n`` questions on as many different images as possible (seeded), for the examples page."""
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    seen, picked = set(), []
    for i in order:
        if ds.image_keys[i] not in seen:
            seen.add(ds.image_keys[i])
            picked.append(i)
    chosen = set(picked)
    picked += [i for i in order if i not in chosen]
    return sorted(picked[:n])


# ----------------------------------------------------------------- the plug-in
@dataclass
class VQAConfig:
    """``vqa`` recipe section."""

    question: str = "question"  # manifest columns
    answer: str = "answer"
    answer_type: str = "answer_type"  # CLOSED / OPEN
    question_type: str | None = "question_type"  # per-type accuracy and the most-common-answer baseline
    organ: str | None = "image_organ"  # per-organ accuracy
    text_model: str | None = None  # question tower and answer decoder initialisation (null: the packaged MiniLM)
    question_layers: int = 6  # text-model blocks that encode the question
    fusion_layers: int = 2  # transformer blocks over [question tokens; image tokens]
    min_answer_count: int = 1  # training answers seen at least this often form the classifier's vocabulary
    generate: bool = True  # the open-ended answer decoder
    decoder_layers: int = 1  # its text-model blocks
    vocab_size: int = 2000  # its compact output vocabulary (tokens of the training answers)
    generation_weight: float = 0.5  # loss = classifier CE + this x decoder CE
    max_length: int = 32  # question / answer tokens
    label_smoothing: float = 0.1
    encoder_lr_scale: float = 0.1  # image encoder LR = optim.lr x this (lora / full)
    text_lr_scale: float = 0.0  # question tower LR = optim.lr x this (0: frozen, the pretrained MiniLM as it is)
    question_only: bool = True  # train the question-only baseline (image -> constant) beside the model
    generation: dict = field(default_factory=lambda: {"num_beams": 1, "max_new_tokens": 12})
    eval_batch_size: int = 32
    examples: int = 16  # rows of examples_<split>.html


@TASKS.register
class VQATask(FinetuneTask):
    name = "vqa"
    Config = VQAConfig
    model_class = VQAModel
    keys = ("image", "question", "answer", "answer_index")

    def split_args(self, cfg: dict, path: str) -> dict:
        if not path.lower().endswith((".csv", ".tsv", ".jsonl")):
            raise ValueError(f"{path}: visual question answering needs a manifest (one row per question), not an npz "
                             "or a folder")
        return {"images_repeat": True}  # several questions per image: only an image in two splits is a leak

    def open_split(self, cfg: dict, split: str | None, train: bool = False, path: str | None = None):
        c = self.config(cfg)
        return QADataset(super().open_split(cfg, split, train=train, path=path), c.question, c.answer, c.answer_type,
                         c.question_type, c.organ)

    def prepare(self, cfg: dict, train, state: dict):
        """The answer vocabulary (normalised training answers seen ``min_answer_count`` times, most frequent
        first) and the decoder's compact vocabulary."""
        c = self.config(cfg)
        counts = Counter(normalize_answer(a) for a in train.answer_texts)
        answers = [a for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= c.min_answer_count and a]
        if not answers:
            raise DataError(f"{train.manifest}: no training answer is seen {c.min_answer_count} times (vqa.min_answer_count)")
        train.set_answers(answers)
        state["answers"] = answers
        tokenizer = AutoTokenizer.from_pretrained(str(c.text_model or default_text_model_path()))
        state["vocab"] = ReportVocab.build(tokenizer, answers, c.vocab_size) if c.generate else None
        covered = sum(counts[a] for a in answers) / len(train)
        print(f"vqa: {len(answers)} answers in the classifier's vocabulary ({100 * covered:.1f} % of the "
              f"{len(train)} training questions)")
        return cfg, train

    def head(self, cfg: dict, state: dict) -> dict:
        c = self.config(cfg)
        decoder = (writer_head(c.text_model, c.decoder_layers, state["vocab"], c.max_length, c.label_smoothing,
                               c.generation) if c.generate else
                   {"text_model": c.text_model, "max_length": c.max_length, "label_smoothing": c.label_smoothing,
                    "generation": {}, "decoder_config": None})
        return {**decoder, "answers": state["answers"], "question_config": question_config(c.text_model, c.question_layers),
                "fusion_layers": c.fusion_layers, "question_only": c.question_only}

    def module(self, cfg: dict, model, train, state: dict):
        c = self.config(cfg)
        return VQAModule(model, c.encoder_lr_scale, c.text_lr_scale, c.generation_weight,
                       frozen_encoder=self.frozen_encoder(cfg), **self.optim(cfg))

    def optim(self, cfg: dict) -> dict:
        return dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"])

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        c = self.config(cfg)
        if "train_qa" not in state:  # the most-common-answer baseline's pool (records only: no image is read)
            state["train_qa"] = self.open_split(cfg, self.section(cfg, "data").train_split, train=False)
        return evaluate_vqa(model, ds, out, split, state["train_qa"], c.eval_batch_size,
                            c.generation, c.examples, cfg["seed"])

    def summary(self, metrics: dict) -> list[str]:
        lines = super().summary(metrics)
        for split, v in metrics.items():
            if isinstance(v, dict) and "model" in v and "image_sensitivity" in v:
                lines.append(f"  {split} (n={v['n']} questions):")
                for name, m in v.items():
                    if isinstance(m, dict) and "accuracy" in m:
                        parts = [f"{k.replace('_', ' ')} {m[k]:.3f}" for k in ("closed_accuracy", "open_accuracy", "open_token_f1")
                                 if k in m]
                        lines.append(f"    {name:<38} " + "  ".join(parts))
                lines.append("    image sensitivity (share of answers changed): " + ", ".join(
                    f"{k} {s:.3f}" for k, s in v["image_sensitivity"].items()))
        return lines
