"""Visual question answering metrics: answer normalisation, closed / open accuracy, open token-F1 and BLEU-1,
per question type and organ, the most-common-answer baseline, and image sensitivity.

The protocol is the one VQA-RAD papers report (MEVF, PubMedCLIP, M3AE): accuracy by exact match after
normalising both answers, closed (yes/no-style) and open questions apart. Normalisation here: lower case,
punctuation dropped (a decimal point between digits kept), the articles a / an / the dropped, number words
zero..twenty written as digits, whitespace collapsed; "Yes." and "yes" are the same answer, "two" and "2"
too. Token-F1 is SQuAD's (token overlap of the normalised answers); BLEU-1 is torchmetrics' sentence BLEU
with unigrams only, averaged over questions.

Image sensitivity (:func:`image_sensitivity`) is the share of questions whose answer changes when the image
does (blank or shuffled): a model that reads the image changes its answers; a question-only model cannot.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from typing import Sequence

from torchmetrics.functional.text import bleu_score

from .changed_images import changed_share

NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
ARTICLES = {"a", "an", "the"}
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """``"The Left  Lung."`` -> ``"left lung"``; ``"Two"`` -> ``"2"``; ``"1.5 cm"`` stays ``"1.5 cm"``."""
    s = _DECIMAL.sub("\0", str(text or "").lower()).translate(_PUNCT).replace("\0", ".")
    return " ".join(NUMBERS.get(w, w) for w in s.split() if w not in ARTICLES)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the token overlap of the two normalised answers (SQuAD's); two empty answers score 1."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


YES_NO = ("yes", "no")


def closed_answer(prediction: str, reference: str) -> str:
    """A free-text answer to a yes/no question as the reference is written: ``"Yes, there is a mass."`` -> ``"yes"``
    (its first word, after normalisation); an answer that does not start with yes or no stays as it is (and
    counts wrong unless it equals the reference). Other closed references (``"left"``, ``"CT"``) are compared whole."""
    if normalize_answer(reference) not in YES_NO:
        return prediction
    words = normalize_answer(prediction).split()
    return words[0] if words and words[0] in YES_NO else prediction


def token_recall(prediction: str, reference: str) -> float:
    """Share of the normalised reference's tokens found in the prediction (LLaVA-Med's open-question recall:
    a long free-text answer that contains the reference scores 1); an empty reference scores 1."""
    p, r = Counter(normalize_answer(prediction).split()), normalize_answer(reference).split()
    if not r:
        return 1.0
    return sum((p & Counter(r)).values()) / len(r)


def bleu_1(prediction: str, reference: str) -> float:
    """Sentence BLEU with unigrams (clipped unigram precision x brevity penalty) of the normalised answers."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    if not p or not r:
        return float(p == r)
    return float(bleu_score([p], [[r]], n_gram=1))


def _scores(predictions: Sequence[str], references: Sequence[str], idx: Sequence[int]) -> dict:
    exact = [normalize_answer(predictions[i]) == normalize_answer(references[i]) for i in idx]
    return {"n": len(idx), "accuracy": sum(exact) / len(idx)} if idx else {"n": 0}


def vqa_metrics(predictions: Sequence[str], references: Sequence[str], answer_types: Sequence[str],
                question_types: Sequence[str] | None = None, organs: Sequence[str] | None = None,
                free_text: bool = False) -> dict:
    """Accuracy (exact match after normalisation) overall, on closed and on open questions, open token-F1,
    token recall and BLEU-1 (``free_text``: a closed yes/no answer is read from its first word, :func:`closed_answer`), and accuracy per question type and per organ (``answer_types``: ``CLOSED`` / ``OPEN``, any
    case)."""
    if not (len(predictions) == len(references) == len(answer_types)):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references, {len(answer_types)} "
                         "answer types: one each per question")
    if not references:
        raise ValueError("no questions to score")
    kinds = [str(t).strip().upper() for t in answer_types]
    closed = [i for i, k in enumerate(kinds) if k == "CLOSED"]
    if free_text:  # a language model's sentences: a yes/no question is answered by the answer's first word
        predictions = [closed_answer(p, r) if k == "CLOSED" else p for p, r, k in zip(predictions, references, kinds)]
    opened = [i for i, k in enumerate(kinds) if k != "CLOSED"]
    out = {"n": len(references), "accuracy": _scores(predictions, references, range(len(references)))["accuracy"],
           "n_closed": len(closed), "n_open": len(opened)}
    for name, idx in (("closed", closed), ("open", opened)):
        if idx:
            out[f"{name}_accuracy"] = _scores(predictions, references, idx)["accuracy"]
    if opened:
        out["open_token_f1"] = sum(token_f1(predictions[i], references[i]) for i in opened) / len(opened)
        out["open_token_recall"] = sum(token_recall(predictions[i], references[i]) for i in opened) / len(opened)
        out["open_bleu_1"] = sum(bleu_1(predictions[i], references[i]) for i in opened) / len(opened)
    for key, groups in (("per_question_type", question_types), ("per_organ", organs)):
        if groups is not None:
            by: dict[str, list[int]] = defaultdict(list)
            for i, g in enumerate(groups):
                by[str(g)].append(i)
            out[key] = {g: _scores(predictions, references, idx) for g, idx in sorted(by.items())}
    return out


def most_common_answers(train_answers: Sequence[str], train_groups: Sequence[str], groups: Sequence[str]) -> list[str]:
    """The most common training answer (normalised) of each question's group (question type + closed/open);
    a group unseen in training gets the most common answer overall. Ties go to the answer seen first."""
    if not train_answers:
        raise ValueError("no training answers for the most-common-answer baseline")
    by: dict[str, Counter] = defaultdict(Counter)
    for a, g in zip(train_answers, train_groups):
        by[str(g)][normalize_answer(a)] += 1
    overall = Counter(normalize_answer(a) for a in train_answers).most_common(1)[0][0]
    return [by[str(g)].most_common(1)[0][0] if str(g) in by else overall for g in groups]


def image_sensitivity(answers: Sequence[str], changed: Sequence[str]) -> float:
    """Share of questions whose normalised answer differs between the real image and a changed one."""
    return changed_share(answers, changed, normalize_answer)
