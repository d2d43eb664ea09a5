"""Save and load encoders as safetensors + config.json (huggingface_hub's ModelHubMixin).

The folder follows medfm's one artifact convention (:mod:`medfm.artifacts`); the mixin adds hub ids.
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

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file

from medfm.artifacts import CLASS_KEY, CONFIG_NAME, WEIGHTS_NAME, class_path, load_state_dict_strict
from medfm.atomic import atomic_folder


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


class HubMixin(PyTorchModelHubMixin, library_name="medfm", tags=["medfm", "medical-imaging"]):
    """Strict, safetensors-only ``save_pretrained`` / ``from_pretrained``.

    The config written is the model's ``__init__`` arguments, ``medfm_class`` (so
    :func:`medfm.load` rebuilds any medfm model from a folder without knowing its class
    beforehand) and ``preprocess``: the preset and arguments the encoder was trained with
    (set by the run that trained it), so a consumer gets model and transforms together
    (:func:`medfm.encoders.create_model_and_transforms`).
    """

    preprocess: dict | None = None

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any):  # type: ignore[override]
        config = dict(self._hub_mixin_config or {})
        config[CLASS_KEY] = class_path(type(self))
        if self.preprocess:
            config["preprocess"] = self.preprocess
        with atomic_folder(save_directory) as tmp:  # a kill never leaves half a folder
            return super().save_pretrained(tmp, config=config, **kwargs)

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
        model.preprocess = read_config(model_id, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token).get("preprocess")
        return model.eval()
