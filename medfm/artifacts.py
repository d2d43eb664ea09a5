"""One save/reload convention for every trained artifact: a folder with ``config.json`` + ``model.safetensors``.

As in diffusers' ``ConfigMixin`` / ``register_to_config``: a class that derives from :class:`Artifact` has
its constructor arguments recorded when it is built, and ``config.json`` holds them (JSON only) with
``medfm_class``, the class that reads it (``"medfm.finetune.classification:ClassificationModel"``);
``model.safetensors`` holds the weights, loaded strictly (every key must match, nothing is unpickled).
A constructor argument that is an artifact of its own (a CLIP model's towers) is a *component*: saved in
the sub-folder of its name (diffusers' pipeline layout), so each part also reloads alone.

Encoders of every family, Hugging Face text towers, CLIP models, task models and generators all derive
from :class:`Artifact`; none writes its own save or load. :func:`load` rebuilds any of them without
knowing the class beforehand, from a folder or (flat artifacts such as encoders) a hub id. Only classes
inside the ``medfm`` package are ever imported from a ``medfm_class`` entry (besides the artifact classes the
running program already defined: a plug-in's model): a folder cannot make medfm import foreign code.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from medfm import atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_KEY = "medfm_class"
RUN_INFO = "run.json"
LEGACY_PACKAGES = ("medfm.encoders",)  # where a bare class name (older encoder folders) is looked up
# classes that moved since a folder was written: its medfm_class -> where the class lives now
MOVED = {
    "medfm.finetune.model:FinetunedClassifier": "medfm.finetune.classification:ClassificationModel",
    "medfm.finetune.model:FinetunedSegmenter": "medfm.heads.segmentation:SegmentationModel",
    "medfm.finetune.segmentation:SegmentationModel": "medfm.heads.segmentation:SegmentationModel",
    "medfm.finetune.model:FinetunedReporter": "medfm.finetune.report_generation:ReportGenerator",
}


def class_path(cls: type) -> str:
    """``"package.module:Class"``: what ``config.json`` stores to name the class."""
    return f"{cls.__module__}:{cls.__qualname__}"


_LOADED: dict[str, type] = {}  # every Artifact subclass defined in this process, by class path


def resolve_class(name: str) -> type:
    """The class a ``medfm_class`` entry names: one already defined in this process (medfm's own, or a plug-in
    a user's code registered), or one inside the medfm package, imported; nothing else is ever imported."""
    name = MOVED.get(name, name)
    if name in _LOADED:
        return _LOADED[name]
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


def resolve_file(model_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str:
    """A local path to ``filename`` in a saved folder, or downloaded from a hub repo id (huggingface_hub;
    with ``HF_HUB_OFFLINE=1`` only its cache is read)."""
    model_id = str(model_id)
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            if filename == CONFIG_NAME:
                raise FileNotFoundError(f"{model_id}: no {CONFIG_NAME} (not a saved medfm model folder)")
            raise FileNotFoundError(f"{model_id}: no {filename} in this folder (expected a save_pretrained folder)")
        return path
    if os.path.exists(model_id):
        raise FileNotFoundError(f"{model_id}: a save_pretrained folder was expected, this is a file")
    if os.path.isabs(model_id) or model_id.startswith(".") or model_id.count("/") != 1:  # a path, not "owner/name"
        raise FileNotFoundError(f"{model_id}: no {filename} (no such folder, and not a hub id 'owner/name')")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)


def read_config(model_id: str | os.PathLike, **hub_kwargs: Any) -> dict:
    """``config.json`` of an artifact folder or hub repo (a clear error when it is not one)."""
    path = resolve_file(model_id, CONFIG_NAME, **hub_kwargs)
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


def load(path: str | os.PathLike, **hub_kwargs: Any):
    """Rebuild any saved medfm model (encoder, task model, CLIP model, text tower, generator, ...) from its
    folder, a run folder (its main artifact) or a hub id, whatever its class."""
    folder = artifact_folder(path) if Path(str(path)).exists() else path
    config = read_config(folder, **hub_kwargs)
    name = config.get(CLASS_KEY)
    if not name:
        raise ValueError(f"{folder}: {CONFIG_NAME} has no {CLASS_KEY!r} entry (not written by medfm)")
    return resolve_class(name).from_pretrained(folder, **hub_kwargs)


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


def to_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON (tuples become lists); anything else is an error naming ``where``."""
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): to_json(v, f"{where}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    raise TypeError(f"{where} = {type(value).__name__} cannot be saved in {CONFIG_NAME}: an artifact's constructor "
                    "arguments must be JSON values, or artifacts named in its `components`")


def _recording(init):
    """Wrap ``__init__`` so that the outermost call records its bound arguments (defaults filled in)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        if "_init_args" not in self.__dict__:  # a subclass's __init__ already recorded the call
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            args_ = dict(bound.arguments)
            args_.pop(next(iter(signature.parameters)))  # self
            for p in signature.parameters.values():
                if p.kind is p.VAR_KEYWORD:
                    args_.update(args_.pop(p.name, {}))
                elif p.kind is p.VAR_POSITIONAL:
                    args_.pop(p.name, None)
            self.__dict__["_init_args"] = args_
        init(self, *args, **kwargs)

    return wrapped


class Artifact:
    """Base of everything medfm saves: ``config.json`` (the recorded constructor arguments) +
    ``model.safetensors`` (+ component sub-folders), written atomically, reloaded strictly.

    A subclass writes no save or load code. It may declare
    * ``components``: constructor arguments (attributes of the same name) that are artifacts of their own,
      each saved into the sub-folder of that name and left out of ``model.safetensors``;
    * ``saved_attributes``: attributes set after construction that the folder keeps (an encoder's
      ``architecture`` and ``preprocess``), restored on reload;
    * ``weights_root``: the sub-module whose weights the file holds (a text tower: its Hugging Face model,
      so that the folder stays a plain Hugging Face folder);
    * ``folder_arg``: the constructor argument that receives the saved folder itself on reload (a text
      tower reads its Hugging Face files from there), left out of the saved config;
    * ``stored_state(state)``: what older folders hold, mapped to today's keys;
    * ``partial_state``: ``_own_state`` keeps only part of the weights; the constructor rebuilds the rest (a
      multimodal LM keeps its projector and LoRA, and reads its pretrained LM again);
    * ``config_key``: nest medfm's entries under this key of a ``config.json`` that ``write_extra`` wrote;
    * ``write_extra(tmp)``: more files to write into the folder (a tokenizer);
    * ``artifact_config()`` / ``from_config()``: only where the constructor arguments are not the whole
      story (a task model rebuilt from its spec, a generator's noise schedule).
    """

    components: ClassVar[tuple[str, ...]] = ()
    saved_attributes: ClassVar[tuple[str, ...]] = ()
    weights_root: ClassVar[str] = ""
    folder_arg: ClassVar[str | None] = None
    config_key: ClassVar[str | None] = None
    partial_state: ClassVar[bool] = False  # _own_state keeps only part of the weights (the rest is rebuilt)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _LOADED[class_path(cls)] = cls
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)  # type: ignore[method-assign]

    # ------------------------------------------------------------ what is saved
    @property
    def init_args(self) -> dict:
        """The constructor arguments this object was built with."""
        return dict(self.__dict__.get("_init_args", {}))

    def artifact_config(self) -> dict:
        """``config.json``'s content: the constructor arguments, components left out (they are folders)."""
        return {k: to_json(v, f"{type(self).__name__}({k}=...)") for k, v in self.init_args.items()
                if k not in self.components and k != self.folder_arg}

    @classmethod
    def from_config(cls, config: dict, folder: Path | None = None):
        """The object with fresh weights: the constructor called with the saved arguments (those it takes) and
        the components reloaded from their sub-folders."""
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        args = {k: v for k, v in config.items() if takes_any or k in params}
        for name in cls.components:
            if folder is not None and (Path(folder) / name).is_dir():
                args[name] = load(Path(folder) / name)
        if cls.folder_arg:
            args[cls.folder_arg] = str(folder)
        return cls(**args)

    @classmethod
    def stored_state(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights a folder holds, as today's class names them (nothing to map by default)."""
        return state

    def write_extra(self, folder: Path) -> None:
        """Files besides config.json and the weights (none by default)."""

    # ------------------------------------------------------------ save / reload
    def _weights_module(self) -> nn.Module:
        return self.get_submodule(self.weights_root) if self.weights_root else self  # type: ignore[attr-defined]

    def _own_state(self) -> dict[str, torch.Tensor]:
        state = self._weights_module().state_dict()
        skip = tuple(f"{c}." for c in self.components)
        return {k: v for k, v in state.items() if not k.startswith(skip)}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the folder atomically (a kill never leaves half of it)."""
        with atomic.atomic_folder(folder) as tmp:
            self.write_extra(tmp)
            config = {**{k: to_json(getattr(self, k), k) for k in self.saved_attributes
                         if getattr(self, k, None) is not None}, **self.artifact_config()}
            if self.config_key:
                path = tmp / CONFIG_NAME
                base = json.loads(path.read_text()) if path.exists() else {}
                config = {**base, self.config_key: config}
            (tmp / CONFIG_NAME).write_text(json.dumps({CLASS_KEY: class_path(type(self)), **config}, indent=2))
            state, seen = {}, set()
            for k, v in self._own_state().items():  # tied weights are stored once; from_pretrained re-ties them
                key = (v.data_ptr(), tuple(v.shape), v.dtype)
                if v.numel() and key in seen:
                    continue
                seen.add(key)
                state[k] = v.detach().cpu().clone().contiguous()  # own storage: safetensors refuses shared memory
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            for name in self.components:
                part = getattr(self, name, None)
                if part is not None:
                    part.save_pretrained(tmp / name)
        return Path(folder)

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, **hub_kwargs: Any):
        """Rebuild from a saved folder (or a hub id) and load its weights strictly."""
        config = read_config(model_id, **hub_kwargs)
        config.pop(CLASS_KEY, None)
        args = config.get(cls.config_key, {}) if cls.config_key else config
        folder = Path(str(model_id)) if os.path.isdir(str(model_id)) else None
        model = cls.from_config({k: v for k, v in args.items() if k not in cls.saved_attributes}, folder=folder)
        for k in cls.saved_attributes:
            if k in args:
                setattr(model, k, args[k])
        weights = resolve_file(model_id, WEIGHTS_NAME, **hub_kwargs)
        state = cls.stored_state(load_file(weights))
        own = model._own_state()
        stored = {(v.data_ptr(), v.shape): k for k, v in own.items() if k in state}
        for k, v in own.items():  # tied weights were stored once: fill their aliases
            if k not in state and (v.data_ptr(), v.shape) in stored:
                state[k] = state[stored[(v.data_ptr(), v.shape)]]
        check_state_dict(model, state, weights, own=own)
        # components are in their own folders; a model whose _own_state keeps part of its weights (a multimodal LM's
        # LoRA, not the pretrained LM it reads again) was checked against that part above
        model._weights_module().load_state_dict(state, strict=not (model.components or model.partial_state))
        return model.eval()


def write_run_info(folder: str | os.PathLike, **info: Any) -> None:
    """``run.json``: what kind of run a folder holds and which sub-folder is its model (merged with what is there)."""
    path = Path(folder) / RUN_INFO
    old = json.loads(path.read_text()) if path.exists() else {}
    atomic.write_json(path, {**old, **info})


def read_run_info(folder: str | os.PathLike) -> dict:
    """``run.json`` of a run folder (a clear error when it is not one)."""
    path = Path(folder) / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a medfm run folder (no {RUN_INFO})")
    return json.loads(path.read_text())
