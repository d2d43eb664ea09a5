"""Save and load encoders as safetensors + config.json (huggingface_hub's ModelHubMixin).

Why a subclass of the mixin: the stock ``PyTorchModelHubMixin`` loads with
``strict=False`` and falls back to pickled ``pytorch_model.bin``. medfm never
unpickles weights and never loads silently: every key must match, and a
mismatch raises an error listing the missing and unexpected keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CLASS_KEY = "medfm_class"


def resolve_file(model_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str:
    """Return a local path to ``filename`` in a folder, or download it from a hub repo id."""
    model_id = str(model_id)
    if os.path.isdir(model_id):
        path = os.path.join(model_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_id}: no {filename} in this folder (expected a save_pretrained folder)")
        return path
    if os.path.exists(model_id):
        raise FileNotFoundError(f"{model_id}: a save_pretrained folder was expected, this is a file")
    return hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs)


def read_config(model_id: str | os.PathLike, **hub_kwargs: Any) -> dict:
    """Read the config.json of a save_pretrained folder or hub repo."""
    with open(resolve_file(model_id, CONFIG_NAME, **hub_kwargs), encoding="utf-8") as f:
        return json.load(f)


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the source and every bad key."""
    own = model.state_dict()
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
            parts.append(
                "shape mismatch " + ", ".join(f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in shape[:10])
            )
        raise ValueError(f"{source}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


class HubMixin(PyTorchModelHubMixin, library_name="medfm", tags=["medfm", "medical-imaging"]):
    """Strict, safetensors-only ``save_pretrained`` / ``from_pretrained``.

    The config written is the model's ``__init__`` arguments plus ``medfm_class``,
    so :func:`medfm.encoders.from_pretrained` can rebuild any medfm model from a
    folder without knowing its class beforehand.
    """

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any):  # type: ignore[override]
        config = dict(self._hub_mixin_config or {})
        config[CLASS_KEY] = type(self).__name__
        return super().save_pretrained(save_directory, config=config, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        **model_kwargs: Any,
    ):
        model = cls(**model_kwargs)
        path = resolve_file(
            model_id,
            WEIGHTS_NAME,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        load_state_dict_strict(model, load_file(path, device=str(map_location)), source=str(model_id))
        return model.eval()
