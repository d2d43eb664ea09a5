"""The base LightningModule of every medfm run: AdamW + warm-up/cosine over the trainable parameters.

Pretraining methods and fine-tuning tasks subclass :class:`TrainingModule`, expose the network being
trained as ``encoder`` and implement ``compute_loss(batch) -> (loss, logs)``. The optimizer is AdamW
with no weight decay on biases, norms, position embeddings and tokens (timm's grouping) over the
*trainable* parameters, under linear warm-up then cosine decay stepped every training step. The
finite-loss guard is a callback (:class:`medfm.run.callbacks.FiniteLossGuard`) that every run has.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from transformers.optimization import get_cosine_schedule_with_warmup


class TrainingModule(L.LightningModule):
    """Base LightningModule: optimizer and schedule; subclasses supply ``encoder`` and ``compute_loss``."""

    def __init__(self, lr: float = 1.5e-4, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, max_steps: int = 1000):
        super().__init__()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.max_steps = warmup_steps, max_steps

    @property
    def encoder(self) -> nn.Module:  # pragma: no cover - abstract
        """The encoder being trained (what a pretraining run exports)."""
        raise NotImplementedError

    # ------------------------------------------------------------ optimizer
    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """Parameters without weight decay besides biases and norms: the encoder's ``no_weight_decay()``."""
        names = getattr(self.encoder, "no_weight_decay", lambda: set())()
        params = dict(self.encoder.named_parameters())
        return [params[n] for n in names if n in params]

    def no_weight_decay(self) -> set[str]:
        """Full parameter names of :meth:`no_weight_decay_params`, for timm's grouping."""
        ids = {id(p) for p in self.no_weight_decay_params()}
        return {n for n, p in self.named_parameters() if id(p) in ids}

    def param_groups(self) -> list[dict]:
        """Optimizer groups (timm skips frozen parameters); subclasses add layer-wise LR decay."""
        return param_groups_weight_decay(self, self.weight_decay, no_weight_decay_list=self.no_weight_decay())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr, betas=self.betas)
        scheduler = get_cosine_schedule_with_warmup(optimizer, self.warmup_steps, max(self.max_steps, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ training
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        for k, v in logs.items():
            self.log(f"train/{k}", v)
        return loss
