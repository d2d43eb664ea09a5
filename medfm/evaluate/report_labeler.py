"""A rule-based finding labeler for chest X-ray report text, with negation and uncertainty (NegEx-style).

Labels are the IU X-ray MeSH label set (:data:`medfm.data.reports.IU_LABELS`). For each sentence, each
finding's mention patterns are searched; a mention is *negated* when a negation trigger precedes it in
the same clause ("no", "without", "negative for", "no evidence of", "free of", "resolved", ...) or a
post-negation follows it ("... is not seen", "... has resolved"), and *uncertain* when an uncertainty
trigger does ("possible", "may", "cannot exclude", "suggestive of", "versus", ...). A clause ends at
"but", "however", "although", ";" or the sentence end. Per report, a finding is 1 (positive anywhere),
-1 (only uncertain), 0 (only negated) or NaN (never mentioned), as CheXpert's labeler reports them.
``normal`` is 1 when no other finding is positive or uncertain.

Chapman et al., "A Simple Algorithm for Identifying Negated Findings and Diseases in Discharge
Summaries", J Biomed Inform 2001 (NegEx). Well-kept libraries (negspacy, medspacy) need spaCy
pipelines; this file needs nothing and is validated against the IU MeSH tags in
``benchmarks/report_labeler_iu.py``.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from medfm.data.reports import IU_LABELS

FINDINGS: dict[str, str] = {  # label -> mention pattern (regular expression, lower-case text)
    "cardiomegaly": r"cardiomegaly|enlarged (?:heart|cardiac silhouette|cardiomediastinal silhouette)|"
                    r"(?:heart|cardiac silhouette|heart size) (?:is |appears )?(?:mildly |moderately |markedly )?enlarged|"
                    r"cardiac enlargement",
    "opacity": r"opacit(?:y|ies)|airspace disease|air space disease|infiltrates?|consolidations?|densit(?:y|ies)",
    "effusion": r"effusions?",
    "atelectasis": r"atelecta(?:sis|tic|ses)",
    "granuloma": r"granulomas?|granulomatous",
    "calcinosis": r"calcifications?|calcified (?!granuloma)",
    "nodule": r"nodules?|nodular",
    "emphysema": r"emphysema(?:tous)?|copd|hyperinflat(?:ed|ion)|hyperexpan(?:ded|sion)|chronic obstructive",
    "edema": r"edema|vascular congestion|pulmonary congestion|interstitial prominence",
    "pneumonia": r"pneumonias?",
    "pneumothorax": r"pneumothora(?:x|ces)",
    "scoliosis": r"scoliosis|scoliotic",
    "fracture": r"fractures?|fractured",
    "hiatal hernia": r"hiatal hernia|hiatus hernia",
    "device": r"catheters?|pacemakers?|port-a-cath|\bport\b|picc|tubes?\b|wires?\b|stents?|clips?\b|"
              r"hardware|devices?\b|prosthes[ie]s|generator",
}
NEG_PRE = (r"\bno\b", r"\bnot\b", r"\bwithout\b", r"negative for", r"no evidence of", r"free of", r"\bclear of",
           r"resolution of", r"resolved", r"\bnor\b", r"rule out", r"ruled out", r"\bnegative\b", r"\babsent\b")
NEG_POST = (r"(?:is|are|was|were) not (?:seen|identified|present|visualized|evident|noted)", r"(?:has|have) resolved",
            r"\bresolved\b", r"(?:is|are) absent", r"not (?:seen|identified|present|visualized)")
UNCERTAIN = (r"possibl[ey]", r"\bmay\b", r"\bmight\b", r"\bcould\b", r"cannot (?:be )?exclude", r"not excluded",
             r"can't exclude", r"questionable", r"\bquestion of\b", r"suggest(?:s|ive|ing)?\b", r"\bversus\b", r"\bvs\b",
             r"likely", r"probabl[ey]", r"concerning for", r"suspicious", r"\bor\b", r"indeterminate",
             r"\bequivocal\b", r"differential")
_CLAUSE = re.compile(r"\bbut\b|\bhowever\b|\balthough\b|;|\bexcept\b|\bwhich\b")
_SENT = re.compile(r"(?<!\d)[.!?](?!\d)|\n")
LABELS = tuple(IU_LABELS)


def _any(patterns: Sequence[str], text: str) -> bool:
    return any(re.search(p, text) for p in patterns)


def mention_status(sentence: str, pattern: str) -> list[int]:
    """The status (1, 0 negated, -1 uncertain) of each mention of ``pattern`` in one sentence."""
    out = []
    bounds = [0] + [m.end() for m in _CLAUSE.finditer(sentence)] + [len(sentence) + 1]
    for m in re.finditer(pattern, sentence):
        start = max(b for b in bounds if b <= m.start())
        end = min(b for b in bounds if b > m.end()) if any(b > m.end() for b in bounds) else len(sentence)
        before, after = sentence[start:m.start()], sentence[m.end():end]
        if _any(NEG_PRE, before) or _any(NEG_POST, after):
            out.append(0)
        elif _any(UNCERTAIN, before) or _any(UNCERTAIN, after[:40]):
            out.append(-1)
        else:
            out.append(1)
    return out


def label_report(text: str) -> dict[str, float]:
    """``{label: 1 | 0 | -1 | nan}`` for one report (see the module docstring)."""
    text = (text or "").lower()
    status: dict[str, list[int]] = {k: [] for k in FINDINGS}
    for sentence in _SENT.split(text):
        for label, pattern in FINDINGS.items():
            status[label] += mention_status(sentence, pattern)
    out: dict[str, float] = {}
    for label, values in status.items():
        out[label] = 1.0 if 1 in values else -1.0 if -1 in values else 0.0 if values else float("nan")
    out["normal"] = 0.0 if any(v in (1.0, -1.0) for v in out.values()) else 1.0
    return {k: out[k] for k in LABELS}


def label_reports(texts: Sequence[str], uncertain: str = "positive") -> np.ndarray:
    """(N, L) binary labels over :data:`LABELS`; ``uncertain`` mentions count as ``positive`` (U-ones) or
    ``negative`` (U-zeros); unmentioned and negated findings are negative."""
    if uncertain not in ("positive", "negative"):
        raise ValueError("uncertain must be 'positive' or 'negative'")
    u = 1.0 if uncertain == "positive" else 0.0
    rows = []
    for t in texts:
        lab = label_report(t)
        rows.append([1.0 if lab[k] == 1.0 else u if lab[k] == -1.0 else 0.0 for k in LABELS])
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(LABELS))


def agreement(pred: np.ndarray, target: np.ndarray, names: Sequence[str] = LABELS) -> dict:
    """Precision, recall and F1 per label, micro (pooled counts) and macro (mean over labels with at least
    one positive reference) averages, of binary (N, L) arrays."""
    p, t = torch.as_tensor(pred).bool(), torch.as_tensor(target).bool()
    tp, fp, fn = (p & t).sum(0).float(), (p & ~t).sum(0).float(), (~p & t).sum(0).float()

    def prf(tp, fp, fn):
        prec = tp / (tp + fp) if tp + fp > 0 else torch.tensor(float("nan"))
        rec = tp / (tp + fn) if tp + fn > 0 else torch.tensor(float("nan"))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else torch.tensor(float("nan"))
        return float(prec), float(rec), float(f1)

    per = {n: dict(zip(("precision", "recall", "f1"), prf(tp[i], fp[i], fn[i])), support=int(t[:, i].sum()))
           for i, n in enumerate(names)}
    micro = dict(zip(("precision", "recall", "f1"), prf(tp.sum(), fp.sum(), fn.sum())))
    present = [v for v in per.values() if v["support"] > 0]
    macro = {k: float(np.nanmean([v[k] for v in present])) if present else float("nan")
             for k in ("precision", "recall", "f1")}
    return {"per_label": per, "micro": micro, "macro": macro, "n": len(p)}


def clinical_agreement(references: Sequence[str], hypotheses: Sequence[str], uncertain: str = "positive") -> dict:
    """Label agreement of generated reports with their references, both labelled by :func:`label_reports`."""
    out = agreement(label_reports(hypotheses, uncertain), label_reports(references, uncertain))
    out["uncertain"] = uncertain
    return out
