"""Conversations as token ids for a causal LM: the chat template, image placeholders, loss on answers only.

A conversation is a list of ``{"from": "human" | "gpt", "value": text}`` turns (LLaVA's layout; ``user`` /
``assistant`` roles are read too). Each ``<image>`` in a human turn stands for one image of the sample and is
expanded to the projector's token count; a sample whose text names no ``<image>`` gets them in front of its
first question (LLaVA's convention). The tokenizer's own chat template renders the turns (SmolLM2's
``<|im_start|>user ... <|im_end|>``); a tokenizer without one gets ``USER: ... ASSISTANT: ...`` lines. Labels are
the answer tokens (and the end-of-turn text after them, so the model learns to stop); everything else is -100.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: int  # image placeholders in the text (each expanded to the projector's token count)


def normalise_turns(turns: list[dict], where: str = "conversation") -> list[dict]:
    """``[{"role", "content"}]`` from LLaVA's ``from`` / ``value`` or chat ``role`` / ``content`` turns."""
    out = []
    for i, t in enumerate(turns):
        role = ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        text = t.get("value", t.get("content"))
        if role is None or not isinstance(text, str):
            raise ValueError(f"{where}: turn {i} is not a human/gpt turn with text: {t!r}")
        out.append({"role": role, "content": text})
    if not any(t["role"] == "user" for t in out):
        raise ValueError(f"{where}: no human turn")
    return out


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    """The text a list of messages renders to (the tokenizer's chat template, or plain role lines)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{m['role'].upper()}: {m['content']}\n" for m in messages)
    return text + ("ASSISTANT:" if generation_prompt else "")


def with_images(messages: list[dict], n_images: int) -> list[dict]:
    """Messages whose text holds one ``<image>`` per image (put in front of the first question if none); with no
    image, the placeholders a text names are taken out (the LM alone is asked the same question)."""
    if n_images == 0:
        return [{**m, "content": m["content"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")} for m in messages]
    named = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if named == n_images:
        return messages
    if named:
        raise ValueError(f"the text names {named} <image> placeholder(s) for {n_images} image(s)")
    out = [dict(m) for m in messages]
    first = next(m for m in out if m["role"] == "user")
    first["content"] = (IMAGE_TOKEN + "\n") * n_images + first["content"]
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, turns: list[dict], n_images: int, max_length: int | None = None,
                        where: str = "conversation") -> Encoded:
    """Token ids and labels of a whole conversation (every assistant turn is a target)."""
    messages = with_images(normalise_turns(turns, where), n_images)
    ids: list[int] = []
    labels: list[int] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _ids(tokenizer, render(tokenizer, messages[:k], generation_prompt=True))
        full = _ids(tokenizer, render(tokenizer, messages[: k + 1], generation_prompt=False))
        if full[: len(prompt)] != prompt:  # templates that rewrite earlier turns: fall back to the longest shared prefix
            n = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            prompt = full[:n]
        labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt):]
        ids = full
    if not ids:
        raise ValueError(f"{where}: no assistant turn to learn from")
    if max_length and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, n_images)


def encode_prompt(tokenizer, question: str | list[dict], n_images: int) -> list[int]:
    """Token ids of a prompt that ends where the model's answer starts (``question``: text, or earlier turns
    ending in a human turn)."""
    turns = [{"from": "human", "value": question}] if isinstance(question, str) else question
    messages = with_images(normalise_turns(turns), n_images)
    return _ids(tokenizer, render(tokenizer, messages, generation_prompt=True))
