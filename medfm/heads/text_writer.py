"""The text writer shared by the task models that write text with a cross-attending decoder (reports in
:mod:`medfm.finetune.report_generation`, answers in :mod:`medfm.finetune.vqa`): a compact output vocabulary
(:class:`ReportVocab`), the decoder warm-started from a Hugging Face text model (BERT family cut to a few
blocks with cross-attention added, or any causal LM), and :class:`TextWriter` (tokenizing, the teacher-forced
loss, ``generate()`` over decoder memory)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertLMHeadModel, DynamicCache, EncoderDecoderCache

from medfm.encoders import default_text_model_path

# transformers 5.x renamed generate()'s `past_key_values` to `cache` (the old name warns and goes in 6.0)
CACHE_ARGUMENT = "cache" if "cache" in getattr(transformers.generation.utils, "ALL_CACHE_NAMES", ()) else "past_key_values"

# --------------------------------------------------------------------------- vocabulary
class ReportVocab:
    """A compact output vocabulary: ``ids[k]`` is the tokenizer id of compact token ``k``."""

    def __init__(self, ids: Sequence[int], unk_id: int):
        self.ids = [int(i) for i in ids]
        if unk_id not in self.ids:
            raise ValueError("the compact vocabulary must hold the tokenizer's unknown token")
        self._to_compact: torch.Tensor | None = None
        self.unk_id = unk_id

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, tokenizer, texts: Sequence[str], max_size: int = 4000) -> "ReportVocab":
        """The ``max_size`` most frequent tokens of ``texts`` (ties by id) plus the special tokens."""
        special = [i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
                               tokenizer.sep_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
        counts = Counter(i for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for i in ids)
        keep = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if i not in special]
        return cls(list(dict.fromkeys(special)) + keep[: max(max_size - len(set(special)), 0)], tokenizer.unk_token_id)

    def to_compact(self, full: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> compact ids (tokens outside the vocabulary become the unknown token)."""
        if self._to_compact is None or self._to_compact.numel() <= int(full.max()):
            size = max(max(self.ids), int(full.max())) + 1
            table = torch.full((size,), self.ids.index(self.unk_id), dtype=torch.long)
            table[torch.tensor(self.ids)] = torch.arange(len(self.ids))
            self._to_compact = table
        return self._to_compact.to(full.device)[full]

    def to_full(self, compact: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.ids, device=compact.device)[compact]


# --------------------------------------------------------------------------- decoder
def decoder_config(text_model: str | None, num_layers: int, vocab_size: int | None) -> dict:
    """The decoder's config: the text model's, made a decoder with cross-attention; for a BERT-family model
    also cut to ``num_layers`` blocks and (when given) a compact vocabulary. Any other Hugging Face causal
    LM (e.g. distilgpt2) keeps its own layers and vocabulary."""
    base = transformers.AutoConfig.from_pretrained(str(text_model or default_text_model_path()))
    if base.model_type != "bert":
        if vocab_size:
            raise ValueError(f"{text_model}: a compact vocabulary needs a BERT-family decoder; set "
                             "report_generation.vocab_size: 0 for a {base.model_type} decoder")
        cfg = base.to_dict()
        cfg.update(add_cross_attention=True)
        for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
            cfg.pop(key, None)
        return cfg
    if not 1 <= num_layers <= base.num_hidden_layers:
        raise ValueError(f"decoder_layers must be 1..{base.num_hidden_layers} for {text_model or 'MiniLM'}")
    cfg = base.to_dict()
    cfg.update(is_decoder=True, add_cross_attention=True, num_hidden_layers=num_layers,
               vocab_size=vocab_size or base.vocab_size, tie_word_embeddings=True)
    for key in ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    return cfg


def decoder_from_config(config: dict) -> nn.Module:
    """A decoder with fresh weights from the config :func:`decoder_config` made (for reloading)."""
    cfg = transformers.AutoConfig.for_model(**config)
    if cfg.model_type == "bert":
        return BertLMHeadModel(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def build_decoder(text_model: str | None = None, num_layers: int = 2, vocab: ReportVocab | None = None,
                  warn: bool = True) -> tuple[nn.Module, list[str]]:
    """A decoder warm-started from ``text_model`` (default: the packaged MiniLM). BERT family: embeddings
    (the compact vocabulary's rows) and the first ``num_layers`` blocks are copied; cross-attention and the
    LM head's transform are new. Other causal LMs load whole, with new cross-attention. The new weights
    are returned and listed in a warning."""
    path = str(text_model or default_text_model_path())
    if transformers.AutoConfig.from_pretrained(path).model_type != "bert":
        decoder, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, add_cross_attention=True, output_loading_info=True)
        new = sorted(info["missing_keys"])
        if warn and new:
            warnings.warn(f"report decoder from {path}: {len(new)} weights start random (cross-attention): "
                          f"{summarise(new)}", stacklevel=2)
        return decoder, new
    config = BertConfig.from_dict(decoder_config(text_model, num_layers, len(vocab) if vocab else None))
    decoder = BertLMHeadModel(config)
    level, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # "weights not used" for the pooler and the dropped blocks: expected
    transformers.logging.disable_progress_bar()  # a bar for loading 100 tensors from disk
    try:
        # a model trained with an MLM head (e.g. `medfm pretrain text_mlm`'s mlm/ folder) brings that head too
        has_head = any("MaskedLM" in a for a in (transformers.AutoConfig.from_pretrained(path).architectures or []))
        source = (AutoModelForMaskedLM if has_head else AutoModel).from_pretrained(path).state_dict()
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()
    own = decoder.state_dict()
    rows = torch.tensor(vocab.ids) if vocab is not None else None
    state = {}
    for key, value in source.items():
        name = key if key.startswith(("bert.", "cls.")) else f"bert.{key}"
        if name not in own or name == "cls.predictions.decoder.weight":
            continue  # the pooler, blocks beyond num_layers; the output layer is tied to the word embeddings
        if rows is not None and name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias",
                                         "cls.predictions.decoder.bias"):
            value = value[rows]
        state[name] = value
    missing = decoder.load_state_dict(state, strict=False).missing_keys
    new = sorted(k for k in missing if k != "cls.predictions.decoder.weight")  # tied: not new
    if warn and new:
        why = "no cross-attention" if has_head else "no LM head and no cross-attention"
        warnings.warn(f"report decoder from {text_model or 'all-MiniLM-L6-v2'}: {len(new)} weights start random "
                      f"(the model ships {why}): {summarise(new)}", stacklevel=2)
    return decoder, new


def summarise(names: Sequence[str]) -> str:
    """Weight names folded to their modules, block numbers merged: ``bert.encoder.layer.{0,1}.crossattention.*,
    cls.predictions.*`` (one short line however many tensors a module has)."""
    def module(name: str) -> str:  # up to its cross-attention / prediction head, else its parent module
        parts = name.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p in ("crossattention", "predictions")), len(parts) - 1)
        return ".".join(parts[:cut]) + ".*"

    groups: dict[str, list[str]] = {}
    for n in dict.fromkeys(module(n) for n in names):  # each module once, in order
        parts = n.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        key = n if idx is None else ".".join(parts[:idx] + ["{}"] + parts[idx + 1:])
        groups.setdefault(key, []).append(parts[idx] if idx is not None else "")
    return ", ".join(k.replace("{}", "{" + ",".join(v) + "}") if "{}" in k else k for k, v in groups.items())


# --------------------------------------------------------------------------- model
def encoder_tokens(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tokens of any medfm encoder: a ViT's tokens, a CNN's last feature map flattened."""
    feats = encoder.forward_features(x)
    return feats.flatten(2).transpose(1, 2) if feats.ndim > 3 else feats


class TextWriter:
    """The text side shared by the models that write text with a cross-attending decoder (reports here,
    answers in :mod:`medfm.finetune.vqa`): tokenizing ``[CLS] text [SEP]`` (compact ids when a vocabulary is
    set), the teacher-forced loss and ``generate()`` over decoder memory. :meth:`init_writer` sets what they
    use: ``decoder``, ``tokenizer``, ``vocab``, ``max_length``, ``label_smoothing`` and the special ids."""

    def init_writer(self, decoder: nn.Module, tokenizer, vocab: ReportVocab | None, max_length: int,
                    label_smoothing: float) -> None:
        self.decoder, self.tokenizer, self.vocab = decoder, tokenizer, vocab
        self.max_length, self.label_smoothing = max_length, label_smoothing
        self.bos_id = self._compact(tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id)
        self.eos_id = self._compact(tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id)
        self.pad_id = self._compact(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    def _compact(self, full_id: int) -> int:
        return int(self.vocab.to_compact(torch.tensor([full_id]))[0]) if self.vocab else int(full_id)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [SEP]`` ids (compact when a vocabulary is set) and attention mask, padded."""
        tok = self.tokenizer
        if tok.cls_token_id is None:  # GPT-style tokenizers add no start and end tokens, and have no padding
            texts = [f"{tok.bos_token}{t}{tok.eos_token}" for t in texts]
            tok.pad_token = tok.pad_token or tok.eos_token
        enc = tok(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = enc["input_ids"]
        if self.vocab is not None:
            ids = self.vocab.to_compact(ids)
        device = next(self.parameters()).device
        return ids.to(device), enc["attention_mask"].to(device)

    def loss(self, memory: torch.Tensor, memory_mask: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Teacher-forced next-token cross-entropy (label smoothing as set) over the report tokens."""
        ids, mask = self.tokenize(texts)
        logits = self.decoder(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], encoder_hidden_states=memory,
                              encoder_attention_mask=memory_mask, use_cache=False).logits
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def generate_from_memory(self, memory: torch.Tensor, memory_mask: torch.Tensor, max_new_tokens: int = 60,
                             num_beams: int = 1, num_return_sequences: int = 1, **kwargs) -> list[str]:
        """Reports for decoder memory; ``kwargs`` go to ``generate()`` (``do_sample``, ``top_p``,
        ``no_repeat_ngram_size``, ``length_penalty``, ...). ``num_return_sequences`` texts per input."""
        start = torch.full((memory.shape[0], 1), self.bos_id, dtype=torch.long, device=memory.device)
        out = self.decoder.generate(
            input_ids=start, encoder_hidden_states=memory, encoder_attention_mask=memory_mask,
            max_new_tokens=max_new_tokens, num_beams=num_beams, num_return_sequences=num_return_sequences,
            bos_token_id=self.bos_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            **{CACHE_ARGUMENT: EncoderDecoderCache(DynamicCache(), DynamicCache())},  # transformers 5 needs it here
            **kwargs)
        if self.vocab is not None:
            out = self.vocab.to_full(out)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def writer_parts(head: dict, pretrained: bool, folder: Path | None, role: str = "report decoder") -> tuple[nn.Module, object, ReportVocab | None]:
    """(decoder, tokenizer, vocabulary) of a task model's ``head``: warm-started from ``head["text_model"]``
    for a new run (its new weights stated once, as a line of the run), or rebuilt from the saved decoder
    config and ``folder/tokenizer`` on reload (the weights then come from ``model.safetensors``)."""
    vocab = ReportVocab(head["vocab"], head["unk_id"]) if head.get("vocab") else None
    if pretrained:
        decoder, new = build_decoder(head["text_model"], head["decoder_config"].get("num_hidden_layers", 0), vocab,
                                     warn=False)
        if new:
            print(f"{role}: warm-started from {head['text_model'] or 'all-MiniLM-L6-v2'}; {len(new)} new "
                  f"weights start random, as expected: {summarise(new)}")
        return decoder, AutoTokenizer.from_pretrained(str(head["text_model"] or default_text_model_path())), vocab
    return decoder_from_config(head["decoder_config"]), AutoTokenizer.from_pretrained(str(folder / "tokenizer")), vocab


def writer_head(text_model: str | None, decoder_layers: int, vocab: ReportVocab | None, max_length: int,
                label_smoothing: float, generation: dict) -> dict:
    """What a task model's spec records of its decoder (:func:`writer_parts` rebuilds it from this)."""
    return {"text_model": text_model, "max_length": max_length, "label_smoothing": label_smoothing,
            "generation": dict(generation),
            "decoder_config": decoder_config(text_model, decoder_layers, len(vocab) if vocab else None),
            "vocab": vocab.ids if vocab else None, "unk_id": vocab.unk_id if vocab else None}
