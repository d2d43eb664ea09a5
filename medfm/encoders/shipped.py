"""Encoders that ship inside the medfm package: ``medfm:NAME`` (``--encoder medfm:tiny-2d``), no network needed.

Each lives in ``medfm/weights/NAME/``: a medfm encoder folder (``config.json`` with its preprocessing, the weights
as fp16 safetensors, read into the model's fp32 parameters) and ``card.json``: what it is, how it was trained (the
recipe, the mixture with its sources' licences and citations, steps, CPU time) and a reference embedding of a fixed
image that the tests compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SCHEME = "medfm:"


def shipped() -> dict[str, Path]:
    """Name -> folder of every encoder in the package."""
    return {p.name: p for p in sorted(WEIGHTS.glob("*")) if (p / "config.json").is_file()}


def shipped_folder(given: str) -> str:
    """The package folder ``medfm:NAME`` names (anything else unchanged); an unknown name lists those there are."""
    if not given.startswith(SCHEME):
        return given
    name = given[len(SCHEME):]
    have = shipped()
    if name not in have:
        raise FileNotFoundError(f"{given}: medfm ships no encoder {name!r} (it has: "
                                f"{', '.join(SCHEME + n for n in have) or 'none'})")
    return str(have[name])


def card(name: str) -> dict:
    """The card of a shipped encoder (what, how trained, data and licences, size)."""
    return json.loads((Path(shipped_folder(SCHEME + name)) / "card.json").read_text())


def list_shipped() -> list[tuple[str, str, str]]:
    """(``medfm:NAME``, one line on what it is, its folder) of every shipped encoder."""
    out = []
    for name, folder in shipped().items():
        c = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
        out.append((SCHEME + name, c.get("summary", ""), str(folder)))
    return out


def reference_image():
    """The fixed image a shipped encoder's stored embedding is of: the MNI152 T1 brain's middle axial slice
    (nilearn ships the file), as a (1, H, W) float array."""
    import numpy as np

    from medfm.data import load, samples

    vol = load(samples.mni152("t1"))["image"][0].numpy()
    return np.ascontiguousarray(vol[:, :, vol.shape[2] // 2][None]).astype(np.float32)
