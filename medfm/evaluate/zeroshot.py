"""Zero-shot classification and image-text retrieval with a CLIP run.

Zero-shot: each class name is put into prompt templates (``"a {} scan."``), the
prompts are embedded by the text tower, and their mean (a prompt ensemble,
re-normalised) is the class embedding; an image gets the class whose embedding
is closest. Findings that are present or absent use positive/negative prompt
pairs (``"{}."`` vs ``"no {}."``): the probability of the positive prompt is the
finding's score. Retrieval ranks all texts for each image (and all images for
each text) by cosine similarity: recall@K, against the chance rate K/N.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from medfm.artifacts import load
from medfm.atomic import write_json
from medfm.data import ManifestDataset
from medfm.encoders import CLIP, preprocess_transform

from .plots import confusion_png, retrieval_png
from .probe import embed_dataset

TEMPLATES = ("{}.", "a medical image of {}.", "a radiology image showing {}.", "a scan of the {}.")
FINDING_PAIRS = (("{}.", "no {}."), ("there is {}.", "there is no {}."), ("findings of {}.", "no evidence of {}."))


@torch.no_grad()
def text_embeddings(model, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Normalised text embeddings (N, D) of a CLIP model (:class:`medfm.encoders.CLIP`)."""
    model.eval()
    out = [model.encode_text(list(texts[i:i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


def class_embeddings(model, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """One embedding per class (K, D): the re-normalised mean over its prompts (prompt ensemble)."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = text_embeddings(model, prompts).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def zero_shot_scores(image_emb: torch.Tensor, class_emb: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Class probabilities (N, K): softmax of scaled cosine similarities."""
    return (scale * F.normalize(image_emb, dim=-1) @ F.normalize(class_emb, dim=-1).T).softmax(-1)


def finding_scores(model, image_emb: torch.Tensor, findings: Sequence[str],
                   pairs: Sequence[tuple[str, str]] = FINDING_PAIRS, scale: float = 100.0) -> torch.Tensor:
    """Probability (N, F) that each finding is present: softmax over its positive and negative prompt
    ensembles (e.g. ``"effusion."`` against ``"no effusion."``)."""
    pos = class_embeddings(model, findings, [p for p, _ in pairs])
    neg = class_embeddings(model, findings, [n for _, n in pairs])
    img = F.normalize(image_emb, dim=-1)
    logits = torch.stack([img @ pos.T, img @ neg.T], dim=-1) * scale  # (N, F, 2)
    return logits.softmax(-1)[..., 0]


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                      keys: Sequence | None = None) -> dict:
    """Recall@K both ways for paired embeddings (row i of each is one pair). ``keys`` (e.g. the caption
    strings) makes every text with the same key as the pair a correct hit (duplicate captions).
    Returns ``image_to_text`` / ``text_to_image`` {"R@K": ...}, ``chance`` {"R@K": K/N} and ``n``."""
    n = len(image_emb)
    if len(text_emb) != n:
        raise ValueError(f"retrieval needs paired embeddings: {n} images, {len(text_emb)} texts")
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
    if keys is None:
        match = torch.eye(n, dtype=torch.bool)
    else:
        ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        codes = torch.tensor([ids[k] for k in keys])
        match = codes[:, None] == codes[None, :]

    def recall(s: torch.Tensor, m: torch.Tensor) -> dict:
        order = s.argsort(dim=1, descending=True)
        hits = m.gather(1, order)  # hits[i, r]: the r-th ranked candidate of query i is correct
        return {f"R@{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}

    return {"image_to_text": recall(sim, match), "text_to_image": recall(sim.T, match.T),
            "chance": {f"R@{k}": min(k, n) / n for k in ks}, "n": n}


def load_clip_run(run: str | os.PathLike) -> CLIP:
    """The CLIP model of a ``medfm pretrain`` CLIP run (its ``model/`` folder; safetensors only)."""
    run = Path(run)
    folder = run / "model" if (run / "model").is_dir() else run
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{run}: not a finished CLIP run (no model/config.json; train one with "
                                "`medfm pretrain encoders/clip_vit_2d.yaml`)")
    model = load(folder)
    if not isinstance(model, CLIP):
        raise ValueError(f"{folder}: a {type(model).__name__}, not a CLIP model")
    return model


def evaluate_zero_shot(run: str | os.PathLike, data: str | os.PathLike, classes: Sequence[str] = (),
                       split: str | None = None, text_key: str | None = None,
                       templates: Sequence[str] = TEMPLATES, prompts: dict[str, dict[str, str]] | None = None,
                       out: str | os.PathLike | None = None) -> dict:
    """Zero-shot accuracy for each label column in ``classes`` (class names = the column's values, or
    the phrases in ``prompts[column][value]``) against the majority-class rate, and retrieval R@1/5/10 when
    ``text_key`` names a text column. Writes ``metrics.json``, ``confusion_<column>.png`` and
    ``retrieval.png`` into ``out`` (default RUN/zero_shot_<split>)."""
    if not classes and not text_key:
        raise ValueError("nothing to evaluate: name label columns (classes) and/or a text column (text_key)")
    model = load_clip_run(run)
    out = Path(out) if out else Path(run) / f"zero_shot_{split or 'all'}"
    out.mkdir(parents=True, exist_ok=True)
    image_encoder = model.image_encoder  # its recorded preprocessing: what the run trained on
    ds = ManifestDataset(data, split=split, text_key=text_key, spatial_dims=image_encoder.spatial_dims,
                         transform=preprocess_transform(image_encoder.preprocess))
    if len(ds) == 0:
        raise ValueError(f"{data}: no rows in split {split!r}")
    image_emb = embed_dataset(model, ds, progress="embedding images", forward=model.encode_image)[0]
    metrics: dict = {"run": str(run), "data": str(data), "split": split, "n": len(ds), "templates": list(templates)}
    for col in classes:
        labels = ManifestDataset(data, split=split, label_keys=col)
        names = list(labels.classes)
        target = torch.tensor([r.label for r in labels.records])
        phrases = [(prompts or {}).get(col, {}).get(c, c) for c in names]
        scores = zero_shot_scores(image_emb, class_embeddings(model, phrases, templates))
        pred = scores.argmax(1)
        k = len(names)
        majority = float(target.bincount(minlength=k).max() / len(target))
        metrics[col] = {
            "classes": names, "prompts": phrases,
            "accuracy": float((pred == target).float().mean()),
            "balanced_accuracy": float(multiclass_accuracy(pred, target, k, average="macro")) if k > 1 else 1.0,
            "majority_rate": majority,
        }
        confusion_png(pred, target, names, out / f"confusion_{col}.png", title=f"zero-shot {col} ({split})")
    if text_key:
        texts = [ds.records[i].text for i in range(len(ds))]
        metrics["retrieval"] = retrieval_metrics(image_emb, text_embeddings(model, texts), keys=texts)
        retrieval_png(metrics["retrieval"], out / "retrieval.png", title=f"retrieval ({split}, n={len(ds)})")
    write_json(out / "metrics.json", metrics)
    return metrics
