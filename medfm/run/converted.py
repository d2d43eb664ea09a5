"""``medfm models convert``: a public model written as medfm folders, so every command takes it as a run."""

from __future__ import annotations

import os
from pathlib import Path

from medfm.encoders.factory import from_converted
from medfm.encoders.formats import is_public, resolve_source as local_path
from medfm.encoders.openclip import clip_from_open_clip
from medfm.encoders.source import resolve_source

from .folder import RunFolder


def write_converted(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """An open_clip model as a CLIP run folder (``model/``, ``encoder/``, ``text/``, ``run.json``: ``medfm
    evaluate`` zero-shots it, ``--encoder`` fine-tunes its image tower); any other format as an encoder folder
    (``encoder/``). Returns ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty (choose a new --out)")
    if not is_public(source):
        raise ValueError(f"{source}: no such checkpoint, or already a medfm folder")
    folder = RunFolder(out)
    if (local_path(source) / "open_clip_config.json").is_file():
        clip = clip_from_open_clip(source)
        for name, artifact in (("model", clip), ("encoder", clip.image_encoder), ("text", clip.text_encoder)):
            folder.save(artifact, name)
        folder.write_info(kind="pretrain", plugin="clip", model="model", converted_from=str(source))
    else:
        resolved = resolve_source(source)
        if resolved.converted is None:
            raise ValueError(f"{source}: not a public format medfm converts (see `medfm models`)")
        folder.save(from_converted(resolved), "encoder")
        folder.write_info(kind="pretrain", plugin="converted", model="encoder", converted_from=str(source))
    return out
