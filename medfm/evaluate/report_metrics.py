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


def _keywords(values: Sequence[str] | dict) -> dict[str, list[str]]:
    """``["left", "right"]`` or ``{"mr": ["mr", "mri"], ...}`` -> value -> lower-case keywords."""
    if isinstance(values, dict):
        return {str(k).lower(): [str(w).lower() for w in (v if isinstance(v, (list, tuple)) else [v])]
                for k, v in values.items()}
    return {str(v).lower(): [str(v).lower()] for v in values}


def mentioned_value(text: str, values: Sequence[str] | dict) -> str | None:
    """The value a text names first (any of its keywords, whole words, case-insensitive), or None."""
    text = (text or "").lower()
    hits = [(m.start(), v) for v, words in _keywords(values).items() for w in words
            for m in [re.search(rf"\b{re.escape(w)}\b", text)] if m]
    return min(hits)[1] if hits else None


def mention_scores(texts: Sequence[str], truth: Sequence[str], values: Sequence[str] | dict) -> dict:
    """How well texts name an attribute (a structure's side, an image's modality, ...): accuracy of the
    first value named against the truth (naming none is wrong), macro F1 over the values, and the share
    of texts naming any value. ``values``: the possible values, or ``{value: [keywords]}``; samples whose
    true value is not among them are left out (``n`` counts the rest)."""
    keys = _keywords(values)
    pairs = [(mentioned_value(t, keys), str(y).lower()) for t, y in zip(texts, truth) if str(y).lower() in keys]
    n = len(pairs)
    acc = sum(p == y for p, y in pairs) / max(n, 1)
    f1s = []
    for v in keys:
        tp = sum(p == v and y == v for p, y in pairs)
        fp = sum(p == v and y != v for p, y in pairs)
        fn = sum(p != v and y == v for p, y in pairs)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "f1_macro": sum(f1s) / len(f1s) if f1s else float("nan"),
            "named": sum(p is not None for p, _ in pairs) / max(n, 1), "n": n}


# ----------------------------------------------------------------- model-based scorers (optional)
def _chexbert_f1(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    import f1chexbert  # optional: pip install f1chexbert (downloads CheXbert weights on first use)

    _, _, report, report_5 = f1chexbert.F1CheXbert()(hyps=list(hypotheses), refs=list(references))
    return {"micro_f1_14": report["micro avg"]["f1-score"], "micro_f1_5": report_5["micro avg"]["f1-score"],
            "version": getattr(f1chexbert, "__version__", "unknown")}


def _radgraph_f1(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    import radgraph  # optional: pip install radgraph (downloads RadGraph weights on first use)

    score = radgraph.F1RadGraph(reward_level="partial")(hyps=list(hypotheses), refs=list(references))[0]
    return {"partial_f1": float(score), "version": getattr(radgraph, "__version__", "unknown")}


MODEL_SCORERS = {"chexbert": _chexbert_f1, "radgraph": _radgraph_f1}


def model_based_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """CheXbert F1 and RadGraph F1, each only where its package and weights load (they are downloaded on
    first use; not possible on machines without a network): the scores with the package version, or the
    reason it was skipped (also printed)."""
    out = {}
    for name, scorer in MODEL_SCORERS.items():
        try:
            out[name] = scorer(references, hypotheses)
        except Exception as e:  # noqa: BLE001 - a missing package, missing weights or no network: say which
            reason = f"{name} skipped: {type(e).__name__}: {e}"
            print(reason)
            out[name] = {"skipped": reason}
    return out
