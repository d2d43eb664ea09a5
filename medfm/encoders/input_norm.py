"""A public model's input normalisation as a fixed layer in front of the encoder.

medfm's presets hand every encoder images scaled to [0, 1] (radiographs by percentiles, CT by a HU window),
one channel per modality. Public foundation models were trained on other inputs: RGB normalised by ImageNet
statistics (DINOv2, SAM, BiomedCLIP), one grey channel normalised by dataset statistics repeated three times
(RAD-DINO), [-1024, 1024] (torchxrayvision). :class:`InputNorm` maps the first to the second exactly:
repeat the channels, subtract ``mean``, divide by ``std`` (both in [0, 1] units, as Hugging Face image
processors state them after their 1/255 rescale). It has no trainable parameters and is saved in the
encoder's config, so a converted encoder reads medfm's inputs as its authors fed theirs, in 2D and 3D.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class InputNorm(nn.Module):
    """``(x.repeat(channels) - mean) / std`` per channel; ``x`` has ``in_chans`` channels (1 or ``channels``)."""

    def __init__(self, in_chans: int, channels: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if in_chans not in (1, channels):
            raise ValueError(f"InputNorm: {in_chans} input channel(s) cannot feed a model of {channels}: "
                             "give 1 (repeated) or as many as the model has")
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"InputNorm: mean {list(mean)} and std {list(std)} need {channels} entries, std > 0")
        self.channels = channels
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, *x.shape[2:])
        shape = (1, self.channels) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mean={self.mean.tolist()}, std={self.std.tolist()}"


def input_layer(in_chans: int, input_norm: dict | None) -> tuple[nn.Module, int]:
    """An encoder's first layer and the channel count after it: an :class:`InputNorm` for a public model's
    ``input_norm`` record, the identity (and ``in_chans``) otherwise."""
    if not input_norm:
        return nn.Identity(), in_chans
    return InputNorm(in_chans, **input_norm), input_norm["channels"]
