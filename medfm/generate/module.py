"""The LightningModule that trains a diffusion generator: DDPM loss, and an EMA of the weights.

With latent diffusion the first ``autoencoder_steps`` steps train the autoencoder alone; then it is frozen
(its parameters get no gradients, so AdamW leaves them alone), the latent scale is measured on the first
diffusion batch and the denoiser trains on its latents.

The EMA (diffusers' ``EMAModel``, with warm-up) is stepped after every optimizer step, saved in every
checkpoint and restored on resume, so a stopped and resumed run exports the average an uninterrupted
run would have; :meth:`DiffusionModule.ema_weights` swaps it in for export and sampling.
"""

from __future__ import annotations

from contextlib import contextmanager

from diffusers.training_utils import EMAModel

from medfm.run import TrainingModule

from .generator import DiffusionGenerator
from .recipe import batch_condition


class DiffusionModule(TrainingModule):
    """DDPM training of a :class:`DiffusionGenerator`, with an EMA of its network's weights that is
    checkpointed (a resumed run continues the same average) and exported."""

    def __init__(self, generator: DiffusionGenerator, cond_dropout: float = 0.1, snr_gamma: float | None = None,
                 ema_decay: float | None = None, **optim):
        super().__init__(**optim)
        self.generator = generator
        self.cond_dropout, self.snr_gamma, self.ema_decay = cond_dropout, snr_gamma, ema_decay
        self.ema: EMAModel | None = None
        self._ema_state: dict | None = None

    @property
    def encoder(self):
        return self.generator.network

    def compute_loss(self, batch: dict):
        g = self.generator
        if g.autoencoder is not None:  # latent diffusion: the autoencoder first, then (frozen) the denoiser
            stage_one = self.global_step < g.spec.autoencoder_steps
            g.autoencoder.requires_grad_(stage_one)
            if stage_one:
                return g.autoencoder_loss(batch["image"], g.spec.kl_weight), {"stage": 1.0}
            if self.global_step == g.spec.autoencoder_steps:
                g.set_latent_scale(batch["image"])
        cond = batch_condition(batch, g.conditioning, g.spec.mask_classes)
        return g.loss(batch["image"], cond, self.cond_dropout, self.snr_gamma), {}

    def on_fit_start(self) -> None:
        if self.ema_decay:
            self.ema = EMAModel(self.generator.network.parameters(), decay=self.ema_decay, use_ema_warmup=True,
                                power=0.75)
            if self._ema_state is not None:  # resumed: continue the checkpointed average
                self.ema.load_state_dict(self._ema_state)
                self.ema.to(self.device)

    def optimizer_step(self, *args, **kwargs) -> None:
        # the EMA follows each optimizer step here, inside the training step: a checkpoint written at the
        # end of the batch (ModelCheckpoint runs before the module's on_train_batch_end) then holds it
        super().optimizer_step(*args, **kwargs)
        g = self.generator
        if self.ema is not None and (g.autoencoder is None or self.global_step >= g.spec.autoencoder_steps):
            self.ema.step(g.network.parameters())  # (latent diffusion: from the denoiser's first step on)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ema_state = checkpoint.get("ema")

    @contextmanager
    def ema_weights(self):
        """The network holds the EMA weights inside the block (the training weights come back after)."""
        if self.ema is None:
            yield
            return
        params = list(self.generator.network.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)
