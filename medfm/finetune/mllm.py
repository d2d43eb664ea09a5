"""The multimodal-LM task (LLaVA-style), in one module: recipe section, task model, training module, data,
evaluation with its controls, plug-in.

Model (:class:`MLLMModel`): any medfm encoder, 2D or 3D (every converted public family included), read at
``mllm.feature_layer`` -> a projector (``mlp2x_gelu``; 3D pooling to a fixed grid; a perceiver resampler) ->
a pretrained causal LM (the packaged SmolLM2-135M-Instruct unless ``mllm.language_model`` names another), image
tokens spliced in at ``<image>`` placeholders (:mod:`medfm.heads.multimodal`). Training stages are recipe
settings: ``alignment`` trains the projector alone (on captions or reports), ``instruction`` the projector and
LoRA on the LM (``mllm.lm_lora``), the encoder as ``method`` says (``linear_probe``: frozen, the default;
``lora``; ``full``); ``mllm.init`` starts from an earlier run's projector and LoRA (stage 2 after stage 1).
The loss is on answer tokens only.

Data (``mllm.kind``): a LLaVA conversation file (``.json`` / ``.jsonl``, read as it is), a VQA manifest (one
question per row) or a report / caption manifest (:mod:`medfm.data.conversations`).

Evaluation, with the controls of the VQA and report tasks: VQA closed accuracy (normalised exact match; a yes/no
answer is read from its first word, "Yes, there is ..." is "yes"; a wrong or unparseable answer counts wrong, none
is dropped), open exact match, open token recall and F1, per question type and organ. Beside the model, always:
the LM alone zero-shot (no image tokens, no LoRA: ``lm_zero_shot``), the LM alone fine-tuned on the same
conversations without image tokens (``lm_only``: a twin LoRA adapter on the same LM, trained in the same run on
the same batches), the model with blank and with shuffled images, the most common training answer. Reports:
captioning metrics, clinical label agreement (the report labeler's), the number of distinct reports and the image
sensitivity, beside the same controls and the most common / random training report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from medfm.atomic import write_text
from medfm.data import DataError
from medfm.data import load
from medfm.data.datasets import finalise_sample
from medfm.data.transforms import with_channels
from medfm.data.conversations import REPORT_PROMPT, conversation_manifest, row_turns
from medfm.encoders import preprocess_transform
from medfm.evaluate.changed_images import ChangedImages, changed_share
from medfm.evaluate.plots import grouped_bars_png
from medfm.evaluate.report_baselines import most_common_report, random_reports
from medfm.evaluate.report_labeler import clinical_agreement
from medfm.evaluate.report_metrics import caption_metrics, tokenize_report
from medfm.evaluate.vqa_metrics import image_sensitivity, most_common_answers, vqa_metrics
from medfm.heads import FrozenEncoder, TaskModel, build_task_encoder, lr_scaled_groups
from medfm.heads.chat import IGNORE, encode_conversation, encode_prompt, normalise_turns
from medfm.heads.multimodal import TWIN, MultimodalLM, expand_images, pad_batch
from medfm.progress import progress_bar
from medfm.run import TrainingModule

from .base import FinetuneTask
from .registry import TASKS

KINDS = ("auto", "conversations", "vqa", "report")
CONVERSATIONS = Path(os.environ.get("MEDFM_CACHE", Path.home() / ".cache" / "medfm")) / "conversations"
STAGES = ("alignment", "instruction")


# --------------------------------------------------------------------------- model
class MLLMModel(TaskModel, MultimodalLM):
    """The task model: :class:`MultimodalLM` saved with its spec (encoder section, tuning method, ``head``: the
    multimodal arguments); the encoder's weights are in ``model.safetensors`` like every task model's."""

    components = ()

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "MLLMModel":
        encoder = build_task_encoder(spec, pretrained=pretrained)
        h = spec["head"]
        model = cls(encoder, language_model=h["language_model"], projector=h["projector"], pool=h["pool"],
                    resampler=h["resampler"], feature_layer=h["feature_layer"], lora=h["lora"], unlock_lm=h["unlock_lm"],
                    lm_only_twin=h.get("lm_only_twin", False))
        model.spec = spec
        return model

    # ------------------------------------------------------------ answering
    def prompt_batch(self, prompts: Sequence[str | list], images: torch.Tensor | None,
                     image_size: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids, one image per prompt when ``images`` is given (none otherwise)."""
        n_img = 1 if images is not None else 0
        per = self.tokens_per_image(image_size) if n_img else 0
        rows = []
        for p in prompts:
            ids = encode_prompt(self.tokenizer, p, n_img)
            rows.append(expand_images(ids, ids, self.image_token_id, per)[0])
        return pad_batch(rows, self.tokenizer.pad_token_id, left=True)

    @torch.no_grad()
    def answer(self, prompts: Sequence[str | list], images: torch.Tensor | None, max_new_tokens: int = 32,
               num_beams: int = 1, adapter: str | None = "default") -> list[str]:
        """Free-text answers to ``prompts`` (questions, or turns ending in a human turn) about ``images`` (one
        per prompt; None: the LM alone, no image tokens); ``adapter``: the LM's LoRA (``"lm_only"``: the twin
        trained without images; None: none, the LM as pretrained)."""
        device = next(self.projector.parameters()).device
        ids, mask = self.prompt_batch(prompts, images, images.shape[2:] if images is not None else None)
        images = images.to(device) if images is not None else None
        with self.adapter(adapter):
            new = self.generate(ids.to(device), mask.to(device), images, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def read_image(self, path: str | Path) -> torch.Tensor:
        """One image or volume file prepared as the model was trained: (1, C, *spatial)."""
        enc = self.spec["encoder"]
        transform = with_channels(preprocess_transform(self.spec["preprocess"]), enc["in_chans"])
        return finalise_sample(transform(load(str(path), spatial_dims=enc["spatial_dims"])))["image"][None]

    def answer_image(self, path: str | Path, question: str | list, **generation) -> str:
        """The answer to ``question`` (or turns ending in a human turn) about the image at ``path``."""
        if isinstance(question, str) and not question.strip():
            raise ValueError("the question is empty: give it in quotes, e.g. \"Is there a pneumothorax?\"")
        gen = {**self.spec["head"].get("generation", {}), **generation}
        return self.answer([question], self.read_image(path), **gen)[0]

    def report_prompt(self) -> str:
        return self.spec["head"].get("prompt") or REPORT_PROMPT


# --------------------------------------------------------------------------- data
class ConversationDataset(Dataset):
    """One conversation per row of a manifest dataset: ``image`` (preprocessed; rows of the same image share
    one load) and ``turns``; per row, without loading images: ``prompts`` (the first human turn), ``references``
    (the first answer), ``answer_types``, ``question_types``, ``organs``, ``image_keys``."""

    def __init__(self, ds, kind: str, columns: dict):
        self.dataset, self.records, self.manifest = ds, ds.records, ds.manifest
        self.post = getattr(ds, "post", None)
        first: dict[str, int] = {}
        self.first = [first.setdefault(str(r.image), i) for i, r in enumerate(ds.records)]
        self.image_keys = [str(r.image) for r in ds.records]
        self.kind = kind
        self.turns = []
        for r in ds.records:
            where = f"{ds.manifest} line {r.line}"
            turns = normalise_turns(row_turns(r.extra, kind, columns, where), where)
            if turns[-1]["role"] != "assistant":
                raise DataError(f"{where}: the conversation ends in a human turn (nothing to learn or score)")
            self.turns.append(turns)
        self.prompts = [next(t["content"] for t in turns if t["role"] == "user") for turns in self.turns]
        self.references = [next(t["content"] for t in turns if t["role"] == "assistant") for turns in self.turns]
        col = lambda name: [str(r.extra.get(columns[name], "") or "") if columns.get(name) else "" for r in ds.records]  # noqa: E731
        self.answer_types = [t.strip().upper() for t in col("answer_type")]
        self.question_types, self.organs = col("question_type"), col("organ")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.dataset[self.first[i]]["image"], "text": json.dumps(self.turns[i])}


class ConversationCollator:
    """Training batches: the conversations tokenised with the LM's chat template, image placeholders expanded,
    labels on answer tokens only, right-padded; images stacked."""

    def __init__(self, tokenizer, image_token_id: int, tokens_per_image: int, max_length: int, text_only: bool = False):
        self.tokenizer, self.image_token_id = tokenizer, image_token_id
        self.tokens_per_image, self.max_length, self.text_only = tokens_per_image, max_length, text_only

    def _encode(self, batch: list[dict], n_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for s in batch:
            enc = encode_conversation(self.tokenizer, json.loads(s["text"]), n_images)
            ids, lab = expand_images(enc.input_ids, enc.labels, self.image_token_id, self.tokens_per_image)
            if len(ids) > self.max_length:
                if ids[: self.max_length].count(self.image_token_id) < self.tokens_per_image * n_images:
                    raise DataError(f"mllm.max_length {self.max_length} cuts the image tokens of a conversation "
                                    f"({len(ids)} tokens)")
                ids, lab = ids[: self.max_length], lab[: self.max_length]
            rows.append(ids)
            labels.append(lab)
        ids, mask = pad_batch(rows, self.tokenizer.pad_token_id, left=False)
        lab = torch.full_like(ids, IGNORE)
        for k, row in enumerate(labels):
            lab[k, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, mask, lab

    def __call__(self, batch: list[dict]) -> dict:
        ids, mask, lab = self._encode(batch, 1)
        out = {"input_ids": ids, "attention_mask": mask, "labels": lab,
               "image": torch.stack([torch.as_tensor(s["image"]) for s in batch])}
        if self.text_only:  # the same conversations without image tokens, for the LM-alone twin
            out["text_ids"], out["text_mask"], out["text_labels"] = self._encode(batch, 0)
        return out


# --------------------------------------------------------------------------- training
class MLLMModule(FrozenEncoder, TrainingModule):
    """Lightning module: the LM's loss on answer tokens. Trained: the projector; LoRA on the LM and
    ``unlock_lm`` parameters at ``lm_lr_scale`` x the LR (stage ``instruction``); the encoder as its tuning
    method left it, at ``encoder_lr_scale`` x (frozen under ``linear_probe``)."""

    def __init__(self, model: MLLMModel, stage: str = "instruction", encoder_lr_scale: float = 0.1,
                 lm_lr_scale: float = 1.0, frozen_encoder: bool = True, **optim):
        super().__init__(**optim)
        self.model, self.frozen_encoder, self.stage = model, frozen_encoder, stage
        self.encoder_lr_scale, self.lm_lr_scale = encoder_lr_scale, lm_lr_scale
        for name, p in model.lm.named_parameters():
            p.requires_grad_(stage == "instruction" and model.lm_kept(name))
        if frozen_encoder:
            model.encoder.requires_grad_(False)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def frozen_parts(self) -> list[nn.Module]:
        return ([self.model.encoder] if self.frozen_encoder else []) + [self.model.lm]

    def param_groups(self) -> list[dict]:
        scales = {id(p): self.encoder_lr_scale for p in self.model.encoder.parameters()}
        scales.update({id(p): self.lm_lr_scale for p in self.model.lm.parameters()})
        return lr_scaled_groups(super().param_groups(), scales, self.lr)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = self.model(batch["input_ids"], batch["attention_mask"], images=batch["image"], labels=batch["labels"]).loss
        if "text_ids" not in batch:
            return loss, {}
        with self.model.adapter(TWIN):  # the twin: the same answers, no image tokens, its own LoRA
            twin = self.model(batch["text_ids"], batch["text_mask"], labels=batch["text_labels"]).loss
        return loss + twin, {"model": loss.detach(), "lm_only": twin.detach()}


# --------------------------------------------------------------------------- evaluation
def answer_all(model: MLLMModel, ds, batch_size: int, generation: dict, images: bool = True,
               adapter: str | None = "default", progress: str | None = None) -> list[str]:
    """The model's answer to every row's first question (``images=False``: the prompt holds no image)."""
    out: list[str] = []
    for start in progress_bar(range(0, len(ds), batch_size), desc=progress, disable=progress is None, leave=False):
        idx = range(start, min(start + batch_size, len(ds)))
        prompts = [ds.prompts[i] if hasattr(ds, "prompts") else ds.ds.prompts[i] for i in idx]
        batch = torch.stack([torch.as_tensor(ds[i]["image"]) for i in idx]) if images else None
        out += model.answer(prompts, batch, adapter=adapter, **generation)
    return out


def _spread(n: int, k: int | None, seed: int) -> list[int]:
    """``k`` of ``n`` rows, seeded, in order (all when ``k`` is None or not smaller)."""
    if not k or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


class ConversationRows(Dataset):
    """Rows ``idx`` of a :class:`ConversationDataset`, with its per-row lists."""

    def __init__(self, ds: ConversationDataset, idx: Sequence[int]):
        self.ds, self.idx = ds, list(idx)
        for name in ("prompts", "references", "answer_types", "question_types", "organs", "image_keys"):
            setattr(self, name, [getattr(ds, name)[i] for i in self.idx])
        self.kind = ds.kind

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return self.ds[self.idx[i]]


def evaluate_mllm(model: MLLMModel, ds, out: Path, split: str, train: ConversationDataset, batch_size: int = 8,
                  generation: dict | None = None, examples: int = 16, seed: int = 0) -> dict:
    """The model and its controls on ``ds`` (see the module docstring); ``answers_<split>.csv`` with every answer
    and ``accuracy_<split>.png`` (VQA) or ``reports_<split>.png`` (reports)."""
    generation = generation or {}
    t0 = time.perf_counter()
    real = answer_all(model, ds, batch_size, generation, progress=f"answering {split}")
    per_answer = (time.perf_counter() - t0) / max(len(ds), 1)
    answerers = {"model": real,
                 "model, blank images": answer_all(model, ChangedImages(ds, "blank"), batch_size, generation,
                                                   progress="blank images"),
                 "model, shuffled images": answer_all(model, ChangedImages(ds, "shuffled", ds.image_keys, seed),
                                                      batch_size, generation, progress="shuffled images"),
                 "lm_only": answer_all(model, ds, batch_size, generation, images=False,
                                       adapter=TWIN if model.twin else "default", progress="LM alone, fine-tuned"),
                 "lm_zero_shot": answer_all(model, ds, batch_size, generation, images=False, adapter=None,
                                            progress="LM alone, zero-shot")}
    vqa = ds.kind == "vqa" or (ds.kind == "conversations" and any(ds.answer_types))
    if vqa:
        groups = lambda d: [f"{t}/{a}" for t, a in zip(d.question_types, d.answer_types)]  # noqa: E731
        answerers["most common answer"] = most_common_answers(train.references, groups(train), groups(ds))
        kinds = ds.answer_types if any(ds.answer_types) else ["OPEN"] * len(ds)
        results = {name: vqa_metrics(a, ds.references, kinds, ds.question_types, ds.organs, free_text=True)
                   for name, a in answerers.items()}
        sensitivity = {k: image_sensitivity(real, answerers[k]) for k in ("model, blank images", "model, shuffled images")}
    else:
        answerers["most common report"] = most_common_report(train.references, len(ds))
        answerers["random report"] = random_reports(train.references, len(ds), seed)
        results = {}
        for name, texts in answerers.items():
            res = caption_metrics(ds.references, texts, meteor=False)
            res["clinical"] = {k: v for k, v in clinical_agreement(ds.references, texts).items() if k != "per_label"}
            res["distinct_reports"] = len(set(tokenize_report(t) for t in texts))
            results[name] = res
        sensitivity = {k: changed_share(real, answerers[k]) for k in ("model, blank images", "model, shuffled images")}
    results = {"n": len(ds), **results, "image_sensitivity": sensitivity,
               "seconds_per_answer": round(per_answer, 3)}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["prompt", "answer_type", "question_type", "reference", *answerers])
    for i in range(len(ds)):
        writer.writerow([ds.prompts[i], ds.answer_types[i], ds.question_types[i], ds.references[i],
                         *(v[i] for v in answerers.values())])
    write_text(out / f"answers_{split}.csv", buf.getvalue())
    if vqa:
        grouped_bars_png({k: {s.replace("_", " "): v[s] for s in ("closed_accuracy", "open_accuracy", "open_token_recall")
                              if s in v} for k, v in results.items() if isinstance(v, dict) and "accuracy" in v},
                         out / f"accuracy_{split}.png", title=f"{split}: {len(ds)} questions", ylabel="score")
    else:
        grouped_bars_png({k: {s: v[s] for s in ("bleu_1", "rouge_l", "cider") if s in v}
                          for k, v in results.items() if isinstance(v, dict) and "bleu_1" in v},
                         out / f"reports_{split}.png", title=f"{split}: {len(ds)} reports", ylabel="score")
    return results


# ----------------------------------------------------------------- the plug-in
@dataclass
class MLLMConfig:
    """``mllm`` recipe section."""

    language_model: str | None = None  # null: the packaged SmolLM2-135M-Instruct; a folder, hf:ORG/NAME or .gguf
    kind: str = "auto"  # conversations (LLaVA JSON / a conversations column) | vqa | report | auto (from the columns)
    conversations: str = "conversations"  # manifest columns
    question: str = "question"
    answer: str = "answer"
    answer_type: str | None = "answer_type"  # CLOSED / OPEN
    question_type: str | None = "question_type"
    organ: str | None = "image_organ"
    text: str = "caption"  # the report / caption column (kind: report)
    prompt: str | None = None  # the request before a report (null: "Describe the findings of this image.")
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu | mlpNx_gelu
    pool: list | None = None  # average-pool the token grid to this grid first (M3D: 3D volumes to a few hundred tokens)
    resampler: dict | None = None  # {latents, depth, heads}: a perceiver resampler (RadFM)
    feature_layer: int = -2  # the encoder block read (LLaVA: -2)
    stage: str = "instruction"  # alignment: the projector alone | instruction: projector + LoRA on the LM
    lm_lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0, "targets": None})
    unlock_lm: list = field(default_factory=list)  # regexes of LM parameters trained in full
    lm_only: bool = True  # train the LM-alone twin (its own LoRA, no image tokens) beside the model (instruction)
    init: str | None = None  # an earlier mllm run whose projector (and LoRA) this run starts from
    max_length: int = 256  # tokens per conversation, image tokens included
    encoder_lr_scale: float = 0.1
    lm_lr_scale: float = 1.0
    generation: dict = field(default_factory=lambda: {"max_new_tokens": 16, "num_beams": 1})
    eval_batch_size: int = 8
    eval_limit: int | None = None  # score at most this many rows per split (a seeded spread; null: all)
    examples: int = 16
    conversation_file: str | None = None  # set by a run given a LLaVA .json: the file its data.path manifest came from


@TASKS.register
class MLLMTask(FinetuneTask):
    name = "mllm"
    Config = MLLMConfig
    model_class = MLLMModel
    keys = ("image", "text")
    headline = ("accuracy",)

    def validate(self, cfg: dict) -> None:
        super().validate(cfg)
        c = self.config(cfg)
        if c.kind not in KINDS:
            raise ValueError(f"mllm.kind {c.kind!r}: one of {', '.join(KINDS)}")
        if c.stage not in STAGES:
            raise ValueError(f"mllm.stage {c.stage!r}: one of {', '.join(STAGES)}")

    def data_path(self, path: str) -> str:
        """A LLaVA ``.json`` file as the CSV manifest medfm reads (written once per file version into
        ``$MEDFM_CACHE/conversations``); any other path as it is."""
        if not path.lower().endswith(".json"):
            return path
        stat = Path(path).stat() if Path(path).exists() else None
        key = hashlib.sha256(f"{Path(path).resolve()}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode())
        out = CONVERSATIONS / f"{Path(path).stem}-{key.hexdigest()[:16]}.csv"
        return str(out if out.exists() else conversation_manifest(path, out))  # this version of the file: converted

    def build(self, cfg: dict, folder):
        d = cfg["data"]
        if d.get("path") and str(d["path"]).lower().endswith(".json"):  # the run records the manifest it read
            cfg["mllm"]["conversation_file"], d["path"] = d["path"], self.data_path(str(d["path"]))
        return super().build(cfg, folder)

    def split_args(self, cfg: dict, path: str) -> dict:
        if not path.lower().endswith((".csv", ".tsv", ".jsonl")):
            raise ValueError(f"{path}: a multimodal LM trains on a manifest or a LLaVA conversation file (.json / "
                             ".jsonl), not an npz or a folder")
        return {"images_repeat": True}

    def columns(self, cfg: dict) -> dict:
        c = self.config(cfg)
        return {"conversations": c.conversations, "question": c.question, "answer": c.answer, "text": c.text,
                "prompt": c.prompt, "answer_type": c.answer_type, "question_type": c.question_type, "organ": c.organ}

    def conversation_kind(self, cfg: dict, ds) -> str:
        c = self.config(cfg)
        if c.kind != "auto":
            return c.kind
        cols = set(ds.records[0].extra) if ds.records else set()
        for kind, col in (("conversations", c.conversations), ("vqa", c.question), ("report", c.text)):
            if col in cols:
                return kind
        raise DataError(f"{ds.manifest}: no {c.conversations!r}, {c.question!r} or {c.text!r} column: set mllm.kind "
                        "and the column names")

    def open_split(self, cfg: dict, split: str | None, train: bool = False, path: str | None = None):
        d = self.section(cfg, "data")
        path = self.data_path(str(path or d.path))
        ds = super().open_split(cfg, split, train=train, path=path)
        return ConversationDataset(ds, self.conversation_kind(cfg, ds), self.columns(cfg))

    def prepare(self, cfg: dict, train, state: dict):
        c = self.config(cfg)
        print(f"mllm: {len(train)} {train.kind} conversations; stage {c.stage}; language model "
              f"{c.language_model or 'smollm2 (packaged)'}")
        return cfg, train

    def head(self, cfg: dict, state: dict) -> dict:
        c = self.config(cfg)
        return {"language_model": c.language_model, "projector": c.projector, "pool": c.pool, "resampler": c.resampler,
                "feature_layer": c.feature_layer, "lora": dict(c.lm_lora) if c.stage == "instruction" else None,
                "unlock_lm": list(c.unlock_lm), "generation": dict(c.generation), "prompt": c.prompt,
                "lm_only_twin": c.lm_only and c.stage == "instruction"}

    def module(self, cfg: dict, model, train, state: dict):
        c = self.config(cfg)
        if c.init:
            load_stage(model, c.init)
        return MLLMModule(model, c.stage, c.encoder_lr_scale, c.lm_lr_scale, frozen_encoder=self.frozen_encoder(cfg),
                          **self.optim(cfg))

    def collate(self, cfg: dict, state: dict):
        c = self.config(cfg)
        model = state["model"]
        size = cfg["encoder"]["img_size"]
        size = [size] * cfg["encoder"]["spatial_dims"] if isinstance(size, int) else size
        return ConversationCollator(model.tokenizer, model.image_token_id, model.tokens_per_image(size), c.max_length,
                                    text_only=model.twin)

    def optim(self, cfg: dict) -> dict:
        return dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"])

    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        c = self.config(cfg)
        if "train_rows" not in state:  # the most-common-answer baseline's pool (records only: no image is read)
            state["train_rows"] = self.open_split(cfg, self.section(cfg, "data").train_split, train=False)
        rows = ConversationRows(ds, _spread(len(ds), c.eval_limit, cfg["seed"]))
        return evaluate_mllm(model, rows, out, split, state["train_rows"], c.eval_batch_size, c.generation,
                             c.examples, cfg["seed"])

    def summary(self, metrics: dict) -> list[str]:
        lines = super().summary(metrics)
        for split, v in metrics.items():
            if isinstance(v, dict) and "model" in v and "image_sensitivity" in v:
                lines.append(f"  {split} (n={v['n']}, {v['seconds_per_answer']} s per answer):")
                for name, m in v.items():
                    if isinstance(m, dict) and ("accuracy" in m or "bleu_1" in m):
                        keys = ("closed_accuracy", "open_accuracy", "open_token_recall", "open_token_f1",
                                "bleu_1", "rouge_l", "cider", "distinct_reports")
                        lines.append(f"    {name:<24} " + "  ".join(
                            f"{k.replace('_', ' ')} {m[k] if isinstance(m[k], int) else format(m[k], '.3f')}"
                            for k in keys if k in m))
                lines.append("    image sensitivity (share of answers changed): " + ", ".join(
                    f"{k} {s:.3f}" for k, s in v["image_sensitivity"].items()))
        return lines


def load_stage(model: MLLMModel, run: str) -> None:
    """Start from an earlier mllm run: its projector and (where this model has the same) LoRA weights."""
    from safetensors.torch import load_file

    path = Path(run) / "model" / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"mllm.init {run}: not a finished mllm run (no model/model.safetensors)")
    state = load_file(str(path))
    own = model.state_dict()
    take = {k: v for k, v in state.items() if (k.startswith("projector.") or "lora_" in k) and k in own
            and own[k].shape == v.shape}
    if not any(k.startswith("projector.") for k in take):
        raise ValueError(f"mllm.init {run}: its projector does not fit this model's (another encoder or LM?)")
    model.load_state_dict(take, strict=False)
    print(f"mllm.init: {len(take)} tensors from {run} (projector{' and LoRA' if any('lora_' in k for k in take) else ''})")
