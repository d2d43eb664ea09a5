"""Report-generation metrics: the captioning scores (BLEU-1..4, ROUGE-L, CIDEr, METEOR) of pycocoevalcap.

pycocoevalcap's BLEU, ROUGE-L and CIDEr are pure Python; METEOR runs its Java jar, so it is computed only
where ``java`` is on the PATH, and skipped with a printed reason (and a ``meteor_skipped`` entry)
elsewhere, never silently. Texts are tokenized here as pycocoevalcap's PTB tokenizer does it (lower
case, punctuation dropped) without its Java step. References are never truncated. An empty generated
report scores as the single token ``<empty>`` (the scorers reject empty strings): it matches nothing.
"""

from __future__ import annotations

import re
import shutil
from typing import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def tokenize_report(text: str) -> str:
    """Lower-case word tokens joined by spaces (punctuation dropped, as the COCO evaluation does)."""
    return " ".join(_TOKEN.findall((text or "").lower())) or "<empty>"


def meteor_available() -> tuple[bool, str]:
    """Whether METEOR can run here, and why not."""
    if shutil.which("java") is None:
        return False, "METEOR skipped: it runs pycocoevalcap's Java jar and `java` is not on the PATH"
    return True, ""


def caption_metrics(references: Sequence[str], hypotheses: Sequence[str], meteor: bool = True) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr (and METEOR where Java runs) of ``hypotheses`` against one reference each,
    corpus-level as pycocoevalcap reports them."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} generated reports")
    if not references:
        raise ValueError("no reports to score")
    gts = {i: [tokenize_report(r)] for i, r in enumerate(references)}
    res = {i: [tokenize_report(h)] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    ok, why = meteor_available()
    if meteor and ok:
        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer  # closes the Java process
    elif meteor:
        print(why)
        out["meteor_skipped"] = why
    out["n"] = len(references)
    return out


def mentioned_value(text: str, values: Sequence[str]) -> str | None:
    """The value of ``values`` a text names first (whole words, case-insensitive), or None."""
    hits = [(m.start(), v) for v in values for m in [re.search(rf"\b{re.escape(v.lower())}\b", (text or "").lower())] if m]
    return min(hits)[1] if hits else None


def mention_scores(texts: Sequence[str], truth: Sequence[str], values: Sequence[str]) -> dict:
    """How well texts name an attribute (e.g. a structure's side, an image's modality): accuracy of the
    first value named against the truth (naming none is wrong), and macro F1 over the values."""
    pred = [mentioned_value(t, values) for t in texts]
    acc = sum(p == y for p, y in zip(pred, truth)) / max(len(truth), 1)
    f1s = []
    for v in values:
        tp = sum(p == v and y == v for p, y in zip(pred, truth))
        fp = sum(p == v and y != v for p, y in zip(pred, truth))
        fn = sum(p != v and y == v for p, y in zip(pred, truth))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "f1_macro": sum(f1s) / len(f1s) if f1s else float("nan"),
            "named": sum(p is not None for p in pred) / max(len(pred), 1)}
