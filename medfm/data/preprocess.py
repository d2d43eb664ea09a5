"""The preprocessing record: how an encoder's inputs are prepared (open_clip's ``PreprocessCfg`` idea). A run
records it with the model it trains, a public model's converter with what its authors used; it is saved in an
encoder's ``config.json`` as ``{"preset", "size", "args"}`` and read back here, and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from monai.transforms import Compose

from .io import load
from .transforms import PRESET_DIMS, PRESETS, with_channels


@dataclass(frozen=True)
class Preprocess:
    """A preset of :data:`medfm.data.transforms.PRESETS` (``radiograph_2d`` | ``ct_3d`` | ``mr_3d``), the input
    size per side (None: keep the input's size) and the preset's own arguments (``spacing``, ``window``)."""

    preset: str = "radiograph_2d"
    size: int | Sequence[int] | None = 224
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; available: {', '.join(PRESETS)}")
        object.__setattr__(self, "args", dict(self.args))

    @property
    def spatial_dims(self) -> int:
        return PRESET_DIMS[self.preset]

    def record(self) -> dict:
        """The JSON record saved with a model (``config.json``'s ``preprocess``)."""
        size = list(self.size) if isinstance(self.size, (tuple, list)) else self.size
        return {"preset": self.preset, "size": size, "args": dict(self.args)}

    @classmethod
    def read(cls, record: "Preprocess | Mapping | None") -> "Preprocess | None":
        """A saved record (or None) as a :class:`Preprocess`; a record missing its preset is an error."""
        if record is None or isinstance(record, Preprocess):
            return record
        if "preset" not in record:
            raise ValueError(f"a preprocessing record needs a 'preset', got {dict(record)!r}")
        return cls(record["preset"], record.get("size", 224), record.get("args") or {})

    def transform(self, train: bool = False, size: Any = "default") -> Compose:
        """The MONAI dictionary transform this record describes; ``size`` overrides the recorded size (None:
        keep the input size)."""
        return PRESETS[self.preset](size=self.size if size == "default" else size, train=train, **self.args)

    def read_file(self, path: str | os.PathLike, channels: int) -> tuple[dict, Any]:
        """A file read by medfm's reader and prepared as this record says for evaluation, with ``channels``
        channels: the raw sample (its image and meta: the geometry to write a result back in) and the prepared
        image (a MetaTensor whose affine is the model's grid)."""
        raw = load(path, spatial_dims=self.spatial_dims)
        transform = with_channels(self.transform(train=False), channels)
        return raw, transform({"image": raw["image"].clone(), "meta": dict(raw["meta"])})["image"]
