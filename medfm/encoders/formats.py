"""Public model formats: which checkpoint layouts medfm reads, how it recognises them, and how each becomes a
medfm encoder.

A :class:`Format` is declared in its family's file (``dinov2.py``, ``xrv.py``, ...) next to the converter,
with what ``medfm models`` prints about it. :func:`open_checkpoint` reads whatever a user points
``encoder.pretrained`` / ``--encoder`` at (a file, a folder, ``hf:ORG/NAME``) without unpickling anything;
:func:`identify` finds its format from the folder's config and the state dict's keys; the format's
``convert`` returns the registered encoder name, the constructor arguments that rebuild the upstream network,
the state dict in medfm's keys, and the preprocessing the upstream model expects. A layout no format accepts
is named by :func:`nearest_format` with the keys that did not fit.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from medfm.artifacts import load_tensors

PICKLE_REMEDY = ("export the state dict with torch.save(model.state_dict(), 'weights.pth') or "
                 "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') where the model was built")
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
CONFIG_FILES = ("config.json", "open_clip_config.json", "preprocessor_config.json")


@dataclass
class Checkpoint:
    """What a user pointed at: the path, its tensors (raw keys), and the JSON files beside them."""

    path: str
    state_dict: dict[str, torch.Tensor]
    configs: dict[str, dict] = field(default_factory=dict)  # file name -> content (config.json, ...)

    @property
    def config(self) -> dict:
        return self.configs.get("config.json", {})


@dataclass
class Converted:
    """A checkpoint in medfm's terms: ``architecture(**args)`` builds the network ``state_dict`` loads into."""

    architecture: str
    args: dict
    state_dict: dict[str, torch.Tensor]
    preprocess: dict | None = None
    source: dict = field(default_factory=dict)  # how the source was built (img_size, patch_size, ...): resampling
    format: str = ""  # the Format that converted it (set by convert_checkpoint)

    def config(self) -> dict:
        """What weight loading needs besides the tensors: the source grid (resampling) and the preprocessing."""
        return {**self.source, "preprocess": self.preprocess, "format": self.format}


@dataclass(frozen=True)
class Format:
    """One public checkpoint layout. ``keys``: regexes its state dict's keys match (each at least once), used
    to recognise it and, when nothing fits, to name the nearest format; ``accepts``: a further check on the
    configs (default: none)."""

    name: str
    architecture: str
    source: str
    preprocess: str
    license: str
    example: str
    keys: tuple[str, ...]
    convert: Callable[[Checkpoint], Converted]
    accepts: Callable[[Checkpoint], bool] = lambda ckpt: True
    # formats this one is more specific than: when a checkpoint matches both, this one is chosen (an original
    # DINOv2 checkpoint also carries every key a timm one has; its ``mask_token`` says it is the original)
    precedes: tuple[str, ...] = ()

    def missing(self, keys: list[str]) -> list[str]:
        """The patterns of ``self.keys`` that no key matches."""
        return [p for p in self.keys if not any(re.search(p, k) for k in keys)]

    def matches(self, ckpt: Checkpoint) -> bool:
        if self.missing(list(ckpt.state_dict)):
            return False
        try:
            return bool(self.accepts(ckpt))
        except (KeyError, IndexError, AttributeError, TypeError):  # a config or tensor not as this format has it
            return False


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def list_formats() -> list[Format]:
    return list(_FORMATS.values())


# ------------------------------------------------------------------------------------------ reading
def resolve_source(source: str | os.PathLike) -> Path:
    """A local path for ``source``; ``hf:ORG/NAME`` is a Hugging Face snapshot: the local cache first, a
    download where a network exists (none with ``HF_HUB_OFFLINE=1``)."""
    source = str(source)
    if not source.startswith("hf:"):
        return Path(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = source[3:]
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        pass
    try:
        return Path(snapshot_download(repo))
    except Exception as e:  # no network, an unknown repo, a gated one
        raise FileNotFoundError(f"{source}: not in the local Hugging Face cache and not downloadable here "
                                f"({type(e).__name__}); download it where a network exists "
                                f"(huggingface-cli download {repo}) and copy the cache or the folder") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch file read with ``weights_only=True`` (a pickled model
    is refused with how to export its state dict); the ``state_dict`` / ``model`` entry of a training
    checkpoint is taken."""
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
        except Exception as e:  # a truncated or corrupt file
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        try:
            sd = load_tensors(path, PICKLE_REMEDY)
        except (RuntimeError, EOFError) as e:  # truncated zip archives, empty files
            raise ValueError(f"{path}: not a readable torch file ({str(e).splitlines()[0]})") from None
    else:
        raise ValueError(f"{path}: unknown weight file type {path.suffix!r} (use .safetensors, .pth, .pt, .bin)")
    for key in ("state_dict", "model", "teacher"):  # Lightning / MAE / DINO training checkpoints
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: holds no state dict (a mapping of names to tensors)")
    return sd


def _folder_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{folder}: no weight file ({', '.join(WEIGHT_FILES)}"
                            f"{'; several candidates: ' + ', '.join(p.name for p in found) if found else ''})")


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """Read a public checkpoint: a weight file, or a folder (its config files and its one weight file)."""
    path = resolve_source(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    configs = {}
    if path.is_dir():
        for name in CONFIG_FILES:
            if (path / name).is_file():
                try:
                    configs[name] = json.loads((path / name).read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path / name}: not valid JSON ({e})") from None
        weights = _folder_weights(path)
    else:
        weights = path
    return Checkpoint(str(source), read_tensors(weights), configs)


# ------------------------------------------------------------------------------------------ matching
def identify(ckpt: Checkpoint) -> Format | None:
    """The format whose keys and config fit ``ckpt``. When several fit, the most specific one is chosen as the
    formats declare it (``precedes``), never by the order the families were imported; several that fit with
    no declared order between them are an error naming them."""
    matches = [f for f in _FORMATS.values() if f.matches(ckpt)]
    best = [f for f in matches if not any(f.name in g.precedes for g in matches)]
    if len(best) > 1:
        raise ValueError(f"{ckpt.path}: fits {len(best)} formats ({', '.join(f.name for f in best)}) and none is declared "
                         "more specific: the format that is names the other in its Format(precedes=...)")
    return best[0] if best else None


def nearest_format(ckpt: Checkpoint) -> str:
    """One sentence: the format whose key patterns fit ``ckpt`` best, and those that did not fit."""
    keys = list(ckpt.state_dict)
    scored = sorted(((len(f.keys) - len(f.missing(keys))) / len(f.keys), f.name, f) for f in _FORMATS.values())
    if not scored:
        return "no public formats are registered"
    score, _, best = scored[-1]
    sample = ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
    return (f"nearest format {best.name!r} ({best.source}; {score:.0%} of its key patterns found), "
            f"its keys that did not fit: {best.missing(keys) or 'none (its config check failed)'}; this file's keys: {sample}")


CONVERSIONS: Counter = Counter()  # conversions by checkpoint path in this process (a run converts its source once)


def convert_checkpoint(ckpt: Checkpoint) -> Converted | None:
    """``ckpt`` converted by its format, or None when no public format fits (a timm or medfm layout)."""
    fmt = identify(ckpt)
    if fmt is None:
        return None
    CONVERSIONS[ckpt.path] += 1
    try:
        converted = fmt.convert(ckpt)
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{ckpt.path}: looks like {fmt.name} ({fmt.source}) but does not convert: "
                         f"{type(e).__name__} {e}") from None
    converted.format = fmt.name
    return converted


def convert(source: str | os.PathLike) -> Converted | None:
    """:func:`convert_checkpoint` of what ``source`` names."""
    return convert_checkpoint(open_checkpoint(source))


def is_public(source: str | os.PathLike) -> bool:
    """Whether ``source`` is something :func:`convert` should read (not a medfm folder, not ``timm:``)."""
    source = str(source)
    if source.startswith("hf:"):
        return True
    path = Path(source)
    if source.startswith("timm:") or not path.exists():
        return False
    if path.is_dir():
        if (path / "run.json").is_file():  # a medfm run folder
            return False
        config = path / "config.json"
        if config.is_file():
            try:
                return "medfm_class" not in json.loads(config.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return True
        return True
    return True


# --------------------------------------------------------------------------------------- key helpers
def rename(state_dict: dict[str, torch.Tensor], rules: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> dict:
    """Apply regex ``rules`` (pattern, replacement) in order to every key; keys matching ``drop`` go."""
    out = {}
    for k, v in state_dict.items():
        if any(re.search(p, k) for p in drop):
            continue
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def strip_prefix(state_dict: dict[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    """Keys without the first of ``prefixes`` that every key has (``module.``, ``dinov2.``, ...)."""
    for p in prefixes:
        if state_dict and all(k.startswith(p) for k in state_dict):
            return {k[len(p):]: v for k, v in state_dict.items()}
    return state_dict


def count_blocks(state_dict: dict[str, torch.Tensor], pattern: str = r"^blocks\.(\d+)\.") -> int:
    idx = [int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0
