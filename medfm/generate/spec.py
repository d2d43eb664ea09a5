"""What a diffusion generator is built from, typed: the recipe's ``diffusion`` section (:class:`DiffusionConfig`) and
the generator's spec (:class:`DiffusionSpec`: that section completed from the training data and the
preprocessing), saved in the generator's ``config.json`` and read back here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

CONDITIONING = ("none", "class", "text", "mask")


@dataclass
class DiffusionConfig:
    """``diffusion``: the generator's network, noise schedule, conditioning and sampler."""

    spatial_dims: int = 2
    image_size: int = 32  # side of the generated image / volume (the preprocessing resizes or crops to it)
    in_chans: int = 1  # grayscale stays one channel
    conditioning: str = "class"  # none | class | text | mask
    num_classes: int | None = None  # class: null = from the training labels
    class_names: list | None = None  # class: names in index order (default: from the data)
    mask_classes: int | None = None  # mask: label values incl. background (null: max in the training masks + 1)
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # UNet width per level
    attention: list[bool] = field(default_factory=lambda: [False, True, True])  # self-/cross-attention per level
    layers_per_block: int = 1
    norm_groups: int = 8
    head_channels: int = 16  # attention head width
    backbone: str = "auto"  # auto (diffusers in 2D, MONAI in 3D) | diffusers | monai
    text_model: str | None = None  # text: HF folder or id of the frozen text tower (null: packaged MiniLM)
    text_max_length: int = 32  # text: prompt tokens (padded to this length)
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers beta schedule: linear | scaled_linear | squaredcos_cap_v2
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    cond_dropout: float = 0.1  # classifier-free guidance: P(condition dropped) in training
    snr_gamma: float | None = 5.0  # Min-SNR-gamma loss weighting (null: plain MSE)
    ema_decay: float | None = 0.999  # EMA of the weights (diffusers' EMAModel, with warm-up); null: off
    sampler: str = "ddim"  # ddpm | ddim | dpm (DPM-Solver++)
    sample_steps: int = 50
    guidance_scale: float = 2.0  # 1: no guidance
    preview: int = 16  # samples in samples.png at the end of training
    latent_diffusion: bool = False  # denoise the latents of a MONAI AutoencoderKL (96^3 and above; meant for a GPU)
    autoencoder_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # each level halves the size
    latent_channels: int = 3
    autoencoder_steps: int = 1000  # latent: the first steps train the autoencoder (L1 + KL), then it is frozen
    kl_weight: float = 1e-6


@dataclass
class DiffusionSpec(DiffusionConfig):
    """The ``diffusion`` section completed from the training data (``num_classes``, ``class_names``,
    ``mask_classes``) with the preprocessing record: the generator's constructor argument."""

    preprocess: dict | None = None

    @classmethod
    def read(cls, spec: "DiffusionSpec | Mapping[str, Any]") -> "DiffusionSpec":
        """A spec, or its saved form (a dict: ``config.json``'s ``spec``; keys it does not know are an error)."""
        if isinstance(spec, DiffusionSpec):
            return dataclasses.replace(spec)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"diffusion spec: unknown key(s) {', '.join(unknown)}")
        return cls(**spec)

    def record(self) -> dict:
        return dataclasses.asdict(self)
