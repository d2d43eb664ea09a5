"""Conversations about images for multimodal LM training: LLaVA's JSON read as it is, and medfm's VQA and
report manifests turned into conversations.

* a LLaVA conversation file (``.json``: a list of records; or ``.jsonl``): ``{"id", "image": "a.png"`` or
  ``"images": [...], "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt",
  "value": "..."}]}``; image paths relative to the file's folder; an optional ``split`` per record (all
  ``train`` otherwise) and any other string fields are kept as columns;
* a VQA manifest (VQA-RAD's columns: ``question``, ``answer``, ``answer_type``, ...): one two-turn conversation
  per row;
* a report or caption manifest (MedPix ``caption``, IU X-ray / engine ``report``): "Describe the image." and the
  text.

:func:`conversation_manifest` writes a LLaVA file as a CSV manifest (``image``, ``images``, ``conversations``
as JSON text, ``split``, the other fields) that medfm's manifest reader opens like every other manifest.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .errors import DataError

REPORT_PROMPT = "Describe the findings of this image."
IMAGE_LIST_SEP = "|"


def read_llava(path: str | os.PathLike) -> list[dict]:
    """The records of a LLaVA conversation file, checked: each has an image (or images) and turns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: a LLaVA conversation file is a non-empty list of records")
    for i, r in enumerate(records):
        where = f"{path} record {i}" + (f" (id {r.get('id')})" if isinstance(r, dict) and r.get("id") else "")
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list) or not r["conversations"]:
            raise DataError(f"{where}: no 'conversations' list of turns")
        if not (r.get("image") or r.get("images")):
            raise DataError(f"{where}: no 'image' or 'images' (text-only records are not training data here)")
    return records


def conversation_manifest(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A LLaVA conversation file written as a CSV manifest beside nothing else (image paths made absolute)."""
    src = Path(path)
    records = read_llava(src)
    rows = []
    for r in records:
        images = r.get("images") or [r["image"]]
        images = [str((src.parent / i).resolve()) if not os.path.isabs(i) else i for i in images]
        extra = {k: v for k, v in r.items() if k not in ("image", "images", "conversations", "split")
                 and isinstance(v, (str, int, float))}
        rows.append({"image": images[0], "images": IMAGE_LIST_SEP.join(images),
                     "conversations": json.dumps(r["conversations"]), "split": r.get("split", "train"), **extra})
    fields = list(dict.fromkeys(k for row in rows for k in row))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def vqa_turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def report_turns(text: str, prompt: str = REPORT_PROMPT) -> list[dict]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": text}]


def row_turns(extra: dict, kind: str, columns: dict, where: str) -> list[dict]:
    """The turns of one manifest row: ``kind`` ``conversations`` (a JSON column), ``vqa`` or ``report``;
    ``columns`` names the columns (``conversations``, ``question``, ``answer``, ``text``, ``prompt``)."""
    def need(col: str) -> str:
        value = str(extra.get(col, "") or "").strip()
        if not value:
            raise DataError(f"{where}: {'an empty' if col in extra else 'no'} column {col!r}")
        return value

    if kind == "conversations":
        try:
            turns = json.loads(need(columns["conversations"]))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: column {columns['conversations']!r} is not JSON ({e.msg})") from None
        return turns
    if kind == "vqa":
        return vqa_turns(need(columns["question"]), need(columns["answer"]))
    if kind == "report":
        return report_turns(need(columns["text"]), columns.get("prompt") or REPORT_PROMPT)
    raise ValueError(f"conversation kind {kind!r}: conversations, vqa or report")
