"""A diffusion generator: the denoising network, its noise schedule, its conditioning and its training loss;
sampling is :class:`medfm.generate.pipeline.DiffusionPipeline` (``generate`` runs it).

:class:`DiffusionGenerator` is one object for 2D images and 3D volumes (the math is the same; only the
network differs, :mod:`medfm.generate.network`). It is trained with DDPM's objective (noise or velocity
prediction under diffusers' ``DDPMScheduler``, optional Min-SNR weighting, Hang et al. 2023) and samples
with any diffusers scheduler built from the same configuration (DDPM, DDIM, DPM-Solver++), all of
which work on 4D and 5D tensors. Conditioning is one of

* ``none``;
* ``class``: an index per sample (``num_classes`` classes; names in ``class_names``);
* ``text``: a prompt per sample, encoded by a frozen text tower (default: the packaged MiniLM) whose
  token states the UNet cross-attends to;
* ``mask``: a label map per sample (values ``0 .. mask_classes - 1``), one-hot as extra input channels,
  so a label map yields an image of its shape that matches it.

Classifier-free guidance (Ho & Salimans 2022): training drops the condition with probability
``cond_dropout`` (no class: index ``num_classes``; no text: the empty prompt; no mask: all-zero channels);
sampling mixes ``eps_u + s * (eps_c - eps_u)``, and ``s = 1`` is the plain conditional prediction.

Latent diffusion (Rombach et al. 2022; for 96^3 and above, meant for a GPU): with ``latent_diffusion``, a MONAI
``AutoencoderKL`` (L1 reconstruction + a small KL term; no perceptual or adversarial loss, whose networks
would have to be downloaded) is trained first, then frozen, and the UNet denoises its scaled latents
(label maps are area-downsampled to the latent grid); sampling decodes at the end. The autoencoder is part
of the artifact.

Images live in [0, 1] outside (as the preprocessing presets give them) and in [-1, 1] inside. Every
sample ``i`` of a call starts from noise seeded by ``seed + i``, so a file exported with its seed can be
regenerated alone. Saved as an artifact (``config.json`` + ``model.safetensors``; the text tower in
``text_encoder/``): ``medfm.load(RUN)``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from medfm.artifacts import Artifact
from medfm.encoders.text import TextEncoder, create_text_encoder

from .network import Denoiser
from .pipeline import DiffusionPipeline
from .spec import CONDITIONING, DiffusionSpec



def latent_autoencoder(spec: DiffusionSpec) -> nn.Module:
    """MONAI's ``AutoencoderKL`` for latent diffusion (``autoencoder_channels`` per level, ``latent_channels``)."""
    from monai.networks.nets import AutoencoderKL

    levels = len(spec.autoencoder_channels)
    return AutoencoderKL(spatial_dims=spec.spatial_dims, in_channels=spec.in_chans, out_channels=spec.in_chans,
                         channels=tuple(spec.autoencoder_channels), latent_channels=spec.latent_channels, num_res_blocks=1,
                         attention_levels=(False,) * levels, norm_num_groups=spec.norm_groups,
                         with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def network_spec(spec: DiffusionSpec) -> DiffusionSpec:
    """What the denoiser sees: the image itself, or (latent diffusion) the autoencoder's latent grid."""
    if not spec.latent_diffusion:
        return spec
    factor = 2 ** (len(spec.autoencoder_channels) - 1)
    if spec.image_size % factor:
        raise ValueError(f"diffusion.image_size {spec.image_size} must be a multiple of {factor} for latent diffusion")
    return dataclasses.replace(spec, in_chans=spec.latent_channels, image_size=spec.image_size // factor)


def noise_schedule(spec: DiffusionSpec) -> DDPMScheduler:
    """The training noise schedule (diffusers' DDPM) the spec names."""
    return DDPMScheduler(num_train_timesteps=spec.train_timesteps, beta_schedule=spec.beta_schedule,
                         prediction_type=spec.prediction_type)


class DiffusionGenerator(Artifact, nn.Module):
    """Denoiser + noise schedule + conditioning (see the module docstring). ``spec`` is the recipe's
    ``diffusion`` section completed from the data (``num_classes``, ``class_names``, ``mask_classes``,
    ``image_size``, ``preprocess``)."""

    components = ("text_encoder",)

    def __init__(self, spec: DiffusionSpec | dict, text_encoder: TextEncoder | None = None, scheduler: dict | None = None):
        super().__init__()
        spec = DiffusionSpec.read(spec)
        if spec.conditioning not in CONDITIONING:
            raise ValueError(f"diffusion.conditioning must be one of {', '.join(CONDITIONING)}, got {spec.conditioning!r}")
        if spec.conditioning == "class" and not spec.num_classes:
            raise ValueError("class conditioning needs num_classes (from the training labels)")
        if spec.conditioning == "mask" and not spec.mask_classes:
            raise ValueError("mask conditioning needs mask_classes (label values incl. background)")
        self.spec = spec
        self.conditioning = spec.conditioning
        self.text_encoder = None
        if self.conditioning == "text":
            self.text_encoder = text_encoder or create_text_encoder(spec.text_model)
            self.text_encoder.requires_grad_(False).eval()
        self.net_spec = network_spec(spec)
        self.network = Denoiser(self.net_spec, text_dim=self.text_encoder.embed_dim if self.conditioning == "text" else None)
        self.scheduler = DDPMScheduler.from_config(scheduler) if scheduler else noise_schedule(spec)
        self.autoencoder = latent_autoencoder(spec) if spec.latent_diffusion else None
        if self.autoencoder is not None:  # 1 / std of the latents, set when the diffusion stage starts (Rombach et al.)
            self.register_buffer("latent_scale", torch.ones(()))

    # ------------------------------------------------------------ artifact
    def artifact_config(self) -> dict:
        """The spec and the noise schedule as built (the constructor's ``scheduler`` is None for a new one)."""
        return {"spec": self.spec.record(), "scheduler": {k: v for k, v in self.scheduler.config.items()}}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.conditioning == "text":
            self.text_encoder.eval()  # frozen: no dropout
        return self

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.spec.in_chans,) + (self.spec.image_size,) * self.spec.spatial_dims

    # ------------------------------------------------------------ latent diffusion
    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> what the denoiser works on (themselves, or scaled autoencoder latents)."""
        if self.autoencoder is None:
            return x
        with torch.no_grad():
            return self.autoencoder.encode_stage_2_inputs(x) * self.latent_scale

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return z
        return self.autoencoder.decode_stage_2_outputs(z / self.latent_scale)

    def autoencoder_loss(self, images: torch.Tensor, kl_weight: float) -> torch.Tensor:
        """First stage of latent diffusion: L1 reconstruction + ``kl_weight`` x KL to N(0, 1)."""
        recon, mu, sigma = self.autoencoder(images * 2 - 1)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp(min=1e-8)) - 1).flatten(1).sum(1).mean()
        return F.l1_loss(recon.float(), (images * 2 - 1).float()) + kl_weight * kl

    @torch.no_grad()
    def set_latent_scale(self, images: torch.Tensor) -> None:
        """Scale latents to unit variance (measured on one batch, once, when the diffusion stage starts)."""
        z = self.autoencoder.encode_stage_2_inputs(images * 2 - 1)
        self.latent_scale.fill_(1.0 / z.float().std().clamp(min=1e-6))

    # ------------------------------------------------------------ conditions
    def condition(self, classes: Sequence | torch.Tensor | None = None, prompts: Sequence[str] | None = None,
                  masks: Sequence[torch.Tensor] | torch.Tensor | None = None) -> dict:
        """User-facing conditions (class names or indices, prompts, label maps) as the network's inputs;
        the one this generator needs must be given, the others must not."""
        given = {"class": classes is not None, "text": prompts is not None, "mask": masks is not None}
        extra = [k for k, v in given.items() if v and k != self.conditioning]
        if extra:
            raise ValueError(f"this generator is {self.conditioning}-conditioned; it takes no {' or '.join(extra)} condition")
        if self.conditioning != "none" and not given[self.conditioning]:
            want = {"class": "classes", "text": "prompts", "mask": "masks"}[self.conditioning]
            raise ValueError(f"this generator is {self.conditioning}-conditioned: give {want}")
        if self.conditioning == "class":
            return {"class_labels": self.class_indices(classes)}
        if self.conditioning == "text":
            return {"prompts": [str(p) for p in prompts]}
        if self.conditioning == "mask":
            return {"mask": self.check_masks(masks)}
        return {}

    def class_indices(self, classes: Sequence | torch.Tensor) -> torch.Tensor:
        """Class names (as in ``class_names``) or indices -> an index tensor (unknown ones are errors)."""
        if self.conditioning != "class":
            raise ValueError(f"this generator is {self.conditioning}-conditioned; it takes no class condition")
        names = [str(c) for c in self.spec.class_names or range(self.spec.num_classes)]
        out = []
        for c in (classes.tolist() if torch.is_tensor(classes) else classes):
            if str(c) in names:
                out.append(names.index(str(c)))
            elif isinstance(c, int) and 0 <= c < self.spec.num_classes:
                out.append(c)
            else:
                raise ValueError(f"unknown class {c!r}; this generator knows {names}")
        return torch.tensor(out, dtype=torch.long)

    def check_masks(self, masks: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Label maps (each (1, *spatial) or (*spatial)) -> one (B, 1, *spatial) long tensor, checked."""
        dims = self.spec.spatial_dims
        items = list(masks) if not torch.is_tensor(masks) or masks.ndim == dims + 2 else [masks]
        items = [torch.as_tensor(m) for m in items]
        items = [m[None] if m.ndim == dims else m for m in items]
        if not items:
            raise ValueError("no masks given")
        for i, m in enumerate(items):
            if m.ndim != dims + 1 or m.shape[0] != 1:
                raise ValueError(f"mask {i}: expected a {dims}D label map, got shape {tuple(m.shape)}")
            if m.shape != items[0].shape:
                raise ValueError(f"mask {i}: shape {tuple(m.shape)} differs from mask 0's {tuple(items[0].shape)}")
            if not torch.isfinite(m.float()).all() or (m != m.round()).any():
                raise ValueError(f"mask {i}: label values must be integers")
            lo, hi = int(m.min()), int(m.max())
            if lo < 0 or hi >= self.spec.mask_classes:
                raise ValueError(f"mask {i}: label values {lo}..{hi} outside 0..{self.spec.mask_classes - 1} "
                                 "(the label values this generator was trained on)")
        factor = 2 ** (len(self.spec.channels) - 1)
        if self.autoencoder is not None:
            factor *= 2 ** (len(self.spec.autoencoder_channels) - 1)
        if any(s % factor for s in items[0].shape[1:]):
            raise ValueError(f"mask shape {tuple(items[0].shape[1:])}: every side must be a multiple of {factor} "
                             f"(the networks halve the size {factor.bit_length() - 1} times)")
        return torch.stack(items).long()

    def null(self, cond: dict, drop: torch.Tensor | None = None) -> dict:
        """``cond`` with the condition removed where ``drop`` is True (everywhere when None)."""
        if not cond:
            return cond
        key = next(iter(cond))
        value = cond[key]
        n = len(value)
        drop = torch.ones(n, dtype=torch.bool) if drop is None else drop.cpu()
        if key == "class_labels":
            return {key: torch.where(drop.to(value.device), torch.full_like(value, self.spec.num_classes), value)}
        if key == "prompts":
            return {key: ["" if d else p for p, d in zip(value, drop.tolist())]}
        keep = (~drop).to(value.device).view(-1, *([1] * (value.ndim - 1)))
        return {key: torch.where(keep, value, torch.full_like(value, -1))}  # -1: no label anywhere (zero one-hot)

    def _inputs(self, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict]:
        """The network's input tensor (mask channels appended) and keyword arguments."""
        if "mask" in cond:
            m = cond["mask"].to(x.device)
            onehot = F.one_hot(m[:, 0].clamp(min=0), self.spec.mask_classes).movedim(-1, 1).to(x.dtype)
            onehot = onehot * (m >= 0).to(x.dtype)
            if onehot.shape[2:] != x.shape[2:]:  # latent diffusion: label fractions on the latent grid
                onehot = F.adaptive_avg_pool3d(onehot, x.shape[2:]) if x.ndim == 5 else F.adaptive_avg_pool2d(onehot, x.shape[2:])
            return torch.cat([x, onehot], 1), {}
        if "prompts" in cond:
            return x, {"context": self.encode_prompts(cond["prompts"]).to(x.dtype)}
        if "class_labels" in cond:
            return x, {"class_labels": cond["class_labels"].to(x.device)}
        return x, {}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token states (B, L, D) of the frozen text tower, padded to a fixed length, so that a sample's
        result does not depend on the other prompts in its batch."""
        tok = self.text_encoder.tokenizer(list(prompts), padding="max_length", truncation=True,
                                          max_length=self.spec.text_max_length, return_tensors="pt")
        return self.text_encoder(input_ids=tok["input_ids"].to(self.device),
                                 attention_mask=tok["attention_mask"].to(self.device))["tokens"]

    # ------------------------------------------------------------ prediction, training
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The network's prediction (noise or velocity) for noisy ``x`` at timesteps ``t``."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t.to(x.device)
        inp, kwargs = self._inputs(x, cond)
        return self.network(inp, t, **kwargs)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict, guidance_scale: float = 1.0) -> torch.Tensor:
        """Classifier-free guided prediction; scale 1 (or no conditioning) is the conditional prediction."""
        if guidance_scale == 1.0 or not cond:
            return self(x, t, cond)
        null = self.null(cond)
        both = {k: (torch.cat([v, null[k]]) if torch.is_tensor(v) else v + null[k]) for k, v in cond.items()}
        t = torch.as_tensor(t, device=x.device)
        t2 = t.expand(x.shape[0]).repeat(2) if t.ndim == 0 else t.repeat(2)
        c, u = self(torch.cat([x, x]), t2, both).chunk(2)
        return u + guidance_scale * (c - u)

    def loss(self, images: torch.Tensor, cond: dict, cond_dropout: float = 0.0, snr_gamma: float | None = None) -> torch.Tensor:
        """DDPM loss on a batch of images in [0, 1]: noise at a random timestep, predict the noise (or
        velocity); the condition is dropped per sample with probability ``cond_dropout``; Min-SNR-gamma
        weighting when ``snr_gamma`` is set. Randomness comes from torch's global RNG (a run's RNG state
        is checkpointed)."""
        x0 = self.to_latent(images * 2 - 1)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.scheduler.add_noise(x0, noise, t)
        if cond and cond_dropout > 0:
            cond = self.null(cond, torch.rand(x0.shape[0], device=x0.device) < cond_dropout)
        pred = self(xt, t, cond)
        velocity = self.scheduler.config.prediction_type == "v_prediction"
        target = self.scheduler.get_velocity(x0, noise, t) if velocity else noise
        mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        if snr_gamma:
            snr = compute_snr(self.scheduler, t)
            weight = snr.clamp(max=snr_gamma) / (snr + 1 if velocity else snr)
            mse = mse * weight
        return mse.mean()

    # ------------------------------------------------------------ sampling
    def generate(self, classes: Sequence | torch.Tensor | None = None, prompts: Sequence[str] | None = None,
                 masks: Sequence[torch.Tensor] | torch.Tensor | None = None, n: int | None = None, seed: int = 0,
                 steps: int | None = None, sampler: str | None = None, guidance_scale: float | None = None,
                 batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Samples in [0, 1]: :class:`medfm.generate.pipeline.DiffusionPipeline` over this generator (the
        sampling loop lives there, apart from the model, as in diffusers)."""
        pipeline = DiffusionPipeline(self, sampler=sampler, steps=steps, guidance_scale=guidance_scale)
        return pipeline(classes, prompts, masks, n=n, seed=seed, batch_size=batch_size, progress=progress)
