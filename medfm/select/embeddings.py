"""Embeddings of a data set by an encoder, computed once and kept on disk.

Selection and curation read the same pool many times (each strategy, each round, each seed). The embeddings
are a file named by a hash of everything they depend on: the encoder's weights (every tensor's bytes), its
preprocessing, the data file or folder (path, size and modification time of the manifest / npz / folder
listing) and the split. A changed encoder or file is a new key, never a stale hit. Files are safetensors
(nothing is unpickled) written atomically."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medfm.atomic import atomic_path
from medfm.data import DataError, open_dataset
from medfm.data.preprocess import Preprocess
from medfm.data.transforms import with_channels
from medfm.encoders import create_encoder, create_model_and_transforms
from medfm.encoders.source import resolve_source
from medfm.evaluate.probe import embed_dataset

CACHE_DIR = Path(os.environ.get("MEDFM_CACHE", Path.home() / ".cache" / "medfm")) / "embeddings"


@dataclass
class Embedder:
    """An encoder with the preprocessing it reads images with, and a short hash of both."""

    model: nn.Module
    transform: object
    preprocess: Preprocess
    name: str

    @functools.cached_property
    def identity(self) -> str:
        """16 hex digits of SHA-256 over the preprocessing record and every weight tensor (once per embedder)."""
        h = hashlib.sha256(json.dumps(self.preprocess.record(), sort_keys=True, default=str).encode())
        for key, t in sorted(self.model.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def load_embedder(encoder: str = "vit_tiny", pretrained: str | None = None, preset: str | None = None,
                  size: int | None = None, spatial_dims: int = 2, seed: int = 0, preset_args: dict | None = None) -> Embedder:
    """An encoder and the preprocessing it reads images with: the one way ``medfm encode``, ``medfm select``
    and ``medfm curate`` build them. ``pretrained`` (anything :func:`medfm.encoders.source.resolve_source`
    takes: a medfm run or encoder folder, a public model file / folder / ``hf:`` id) with the preprocessing it
    records (:func:`medfm.encoders.create_model_and_transforms`); a bare weight file or ``timm:<name>`` loaded
    into the registered ``encoder``; or a randomly initialised ``encoder`` (``seed`` fixes its weights).
    ``preset`` / ``size`` / ``preset_args`` replace the recorded preprocessing."""
    source = resolve_source(pretrained) if pretrained else None
    if source is not None and source.kind in ("medfm", "public"):
        model, _ = create_model_and_transforms(source.given, spatial_dims=spatial_dims if source.kind == "public" else None)
        recorded = Preprocess.read(getattr(model, "preprocess", None))
        name = str(pretrained)
    else:
        torch.manual_seed(seed)
        model = create_encoder(encoder, spatial_dims=spatial_dims, in_chans=1, img_size=size or 224, pretrained=pretrained)
        recorded, name = None, str(pretrained) if pretrained else f"{encoder} (random init, seed {seed})"
    dims = getattr(model, "spatial_dims", spatial_dims)
    default = "radiograph_2d" if dims == 2 else "mr_3d"
    use_recorded = recorded is not None and not preset
    preprocess = Preprocess(preset or (recorded.preset if recorded else default),
                            size or (recorded.size if recorded else None) or _first(getattr(model, "img_size", None)) or 224,
                            preset_args if preset_args is not None else (recorded.args if use_recorded else {}))
    if preprocess.spatial_dims != dims:
        raise ValueError(f"preset {preprocess.preset} is for {preprocess.spatial_dims}D inputs but encoder "
                         f"{name} is {dims}D")
    transform = with_channels(preprocess.transform(), int(getattr(model, "in_chans", 1) or 1))
    model.eval()
    return Embedder(model, transform, preprocess, name)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def data_identity(path: str | os.PathLike, split: str | None) -> str:
    """What the data's embeddings depend on besides the encoder: the file (or the folder's listing), its size
    and modification time, and the split."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)]
    if p.is_dir():
        stats += sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file())
    return hashlib.sha256(json.dumps([stats, split]).encode()).hexdigest()[:16]


def embed(embedder: Embedder, data: str | os.PathLike, split: str | None = "train", label: str | None = None,
          cache: str | os.PathLike | None = CACHE_DIR, batch_size: int = 64, progress: bool = True,
          on_error: str = "raise"):
    """(dataset, embeddings (N, D) float32 numpy, labels (N,) or None) of ``split`` of ``data``; read from
    ``cache`` when this encoder already embedded this data (``cache=None``: always compute). ``on_error="skip"``
    leaves out manifest rows that cannot be read (an empty label, a missing file), with a warning naming them."""
    dataset = open_dataset(data, split=split, label=label, transform=embedder.transform, on_error=on_error)
    if len(dataset) == 0:
        raise DataError(f"{data}: split {split!r} is empty")
    dims, wants = dataset.load_sample(0)["meta"]["spatial_dims"], embedder.preprocess.spatial_dims
    if dims != wants:
        raise ValueError(f"{dataset.describe(0)} is {dims}D but {embedder.name} reads {wants}D images (preset "
                         f"{embedder.preprocess.preset}); use a {dims}D encoder and preset")
    file = None
    if cache is not None:
        file = Path(cache) / f"{embedder.identity}_{data_identity(data, split)}_{label or 'nolabel'}.safetensors"
        if file.exists():
            from safetensors.numpy import load_file

            stored = load_file(str(file))
            if len(stored["embeddings"]) == len(dataset):
                return dataset, stored["embeddings"], stored.get("labels")
    try:
        with torch.no_grad():
            feats, labels = embed_dataset(embedder.model, dataset, batch_size=batch_size,
                                          progress="embedding" if progress else None)
    except RuntimeError as e:  # a 3D volume into a 2D encoder and the like: say which data and encoder
        raise ValueError(f"{embedder.name} cannot embed {data} (split {split}): "
                         f"{str(e).splitlines()[0]}") from e
    emb = feats.numpy().astype(np.float32)
    lab = None if labels is None or labels.ndim != 1 else labels.numpy().astype(np.int64)
    if file is not None:
        from safetensors.numpy import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            save_file({"embeddings": emb, **({"labels": lab} if lab is not None else {})}, str(tmp))
    return dataset, emb, lab
