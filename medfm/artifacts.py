"""One save/reload convention for every trained artifact: a folder with ``config.json`` + ``model.safetensors``.

As in diffusers' ``ConfigMixin``: ``config.json`` holds what rebuilds the object (its constructor
arguments, JSON only) and ``medfm_class``, the class that reads it (``"medfm.tasks.classification:ClassificationModel"``);
``model.safetensors`` holds the weights, loaded strictly (every key must match, nothing is unpickled).
A composite (a CLIP model, a task model) keeps its self-contained parts in sub-folders of the same
form, named in ``config.json`` (diffusers' pipeline layout), so each part also reloads alone.

``load(folder)`` rebuilds any of them without knowing the class beforehand. Only classes inside the
``medfm`` package are ever imported from a ``medfm_class`` entry: a folder cannot make medfm run
foreign code. Encoders (:class:`medfm.encoders.hub.HubMixin`) and Hugging Face text towers
(:class:`medfm.encoders.text.TextEncoder`) follow the same convention.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from medfm.atomic import atomic_folder, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_KEY = "medfm_class"
RUN_INFO = "run.json"
LEGACY_PACKAGES = ("medfm.encoders",)  # where a bare class name (older encoder folders) is looked up


def class_path(cls: type) -> str:
    """``"package.module:Class"``: what ``config.json`` stores to name the class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(name: str) -> type:
    """The class a ``medfm_class`` entry names; only classes inside the medfm package are imported."""
    if ":" not in name:  # older folders name the class alone; encoders register theirs by name
        for pkg in LEGACY_PACKAGES:
            cls = getattr(importlib.import_module(pkg), name, None)
            if isinstance(cls, type):
                return cls
        raise ValueError(f"unknown medfm class {name!r}")
    module, qualname = name.split(":", 1)
    if module != "medfm" and not module.startswith("medfm."):
        raise ValueError(f"{CLASS_KEY} {name!r} is outside the medfm package; refusing to import it")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type) or not hasattr(obj, "from_pretrained"):
        raise ValueError(f"{CLASS_KEY} {name!r} is not a medfm class that can be reloaded")
    return obj


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of an artifact folder (a clear error when it is not one)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (not a saved medfm model folder)")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def artifact_folder(path: str | os.PathLike) -> Path:
    """``path`` itself, or, for a run folder, the artifact its ``run.json`` names (``model``)."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists() and (path / RUN_INFO).exists():
        name = read_run_info(path).get("model")
        if not name:
            raise FileNotFoundError(f"{path}: this run has not exported a model yet (no 'model' in {RUN_INFO})")
        return path / name
    return path


def load(path: str | os.PathLike, **kwargs: Any):
    """Rebuild any saved medfm model (encoder, task model, CLIP model, text tower, ...) from its folder,
    or from a run folder (its main artifact), whatever its class."""
    folder = artifact_folder(path)
    config = read_config(folder)
    name = config.get(CLASS_KEY)
    if not name:
        raise ValueError(f"{folder / CONFIG_NAME}: no {CLASS_KEY!r} entry (not written by medfm)")
    return resolve_class(name).from_pretrained(str(folder), **kwargs)


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                     own: dict[str, torch.Tensor] | None = None) -> None:
    """Raise an error naming ``source`` and every missing, unexpected or mis-shaped key (against ``own``,
    default the model's whole state dict)."""
    own = model.state_dict() if own is None else own
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shape:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shape[:10]))
        raise ValueError(f"{source}: weights do not fit {type(model).__name__}: " + "; ".join(parts))


def load_tensors(path: str | os.PathLike, remedy: str) -> Any:
    """``torch.load`` of a file medfm did not necessarily write, tensors and plain data only
    (``weights_only=True``): a file that also holds pickled Python objects (they can run code) is refused
    with a ValueError naming it and ``remedy`` (torch's own message suggests ``weights_only=False``)."""
    import pickle

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused: the file holds pickled Python objects besides tensors, which medfm "
                         f"never loads (they can run code); {remedy}") from None


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the source and every bad key."""
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)


class Artifact:
    """Mixin for ``nn.Module`` s saved as ``config.json`` + ``model.safetensors`` (+ component sub-folders).

    A subclass implements :meth:`artifact_config` (JSON-able constructor arguments) and
    :meth:`from_config` (the object with fresh weights). ``components`` names attributes that are
    artifacts of their own (e.g. a CLIP model's towers): each is saved into the sub-folder of that
    name and left out of ``model.safetensors``; ``from_config`` gets the folder to load them from.
    """

    components: tuple[str, ...] = ()

    def artifact_config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict, folder: Path | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def _own_state(self) -> dict[str, torch.Tensor]:
        skip = tuple(f"{c}." for c in self.components)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}  # type: ignore[attr-defined]

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the folder atomically (a kill never leaves half of it)."""
        with atomic_folder(folder) as tmp:
            config = {CLASS_KEY: class_path(type(self)), **self.artifact_config()}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            state, seen = {}, set()
            for k, v in self._own_state().items():  # tied weights are stored once; from_pretrained re-ties them
                key = (v.data_ptr(), tuple(v.shape), v.dtype)
                if v.numel() and key in seen:
                    continue
                seen.add(key)
                state[k] = v.detach().cpu().clone().contiguous()  # own storage: safetensors refuses shared memory
            save_file(state, str(tmp / WEIGHTS_NAME))
            for name in self.components:
                getattr(self, name).save_pretrained(tmp / name)
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **_: Any):
        """Rebuild from ``folder`` and load its weights strictly."""
        folder = Path(folder)
        config = read_config(folder)
        model = cls.from_config({k: v for k, v in config.items() if k != CLASS_KEY}, folder=folder)
        state = load_file(str(folder / WEIGHTS_NAME))
        own = model._own_state()
        stored = {(v.data_ptr(), v.shape): k for k, v in own.items() if k in state}
        for k, v in own.items():  # tied weights were stored once: fill their aliases
            if k not in state and (v.data_ptr(), v.shape) in stored:
                state[k] = state[stored[(v.data_ptr(), v.shape)]]
        check_state_dict(model, state, str(folder / WEIGHTS_NAME), own=own)
        model.load_state_dict(state, strict=False)  # components were loaded from their own folders
        return model.eval()


def write_run_info(folder: str | os.PathLike, **info: Any) -> None:
    """``run.json``: what kind of run a folder holds and which sub-folder is its model (merged with what is there)."""
    path = Path(folder) / RUN_INFO
    old = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**old, **info})


def read_run_info(folder: str | os.PathLike) -> dict:
    """``run.json`` of a run folder (a clear error when it is not one)."""
    path = Path(folder) / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a medfm run folder (no {RUN_INFO})")
    return json.loads(path.read_text())
