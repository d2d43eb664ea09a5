"""What every pretraining LightningModule shares: the optimizer and schedule, the NaN guard, the encoder export.

Subclasses (MAE, DINO, ...) hold their networks, expose the encoder being
pretrained as ``encoder`` (what the run exports), and implement
``compute_loss(batch) -> (loss, logs)`` and ``make_view(...)`` (their augmentation). The optimizer is AdamW with no
weight decay on biases, norms, position embeddings and tokens (timm's
grouping), under linear warm-up then cosine decay, stepped every training step.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from transformers.optimization import get_cosine_schedule_with_warmup


class PretrainModule(L.LightningModule):
    """Base LightningModule for self-supervised pretraining of ``self.encoder``."""

    def __init__(self, lr: float = 1.5e-4, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, max_steps: int = 1000):
        super().__init__()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.max_steps = warmup_steps, max_steps

    @property
    def encoder(self) -> nn.Module:  # pragma: no cover - abstract
        """The encoder being pretrained (exported with ``save_pretrained`` at the end of a run)."""
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

    def configure_optimizers(self):
        groups = param_groups_weight_decay(self, self.weight_decay, no_weight_decay_list=self.no_weight_decay())
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        scheduler = get_cosine_schedule_with_warmup(optimizer, self.warmup_steps, max(self.max_steps, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ training
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.compute_loss(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        for k, v in logs.items():
            self.log(f"train/{k}", v)
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop the run (on every rank) before a NaN/inf loss can reach the weights or a checkpoint."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise FloatingPointError(
                f"{type(self).__name__}: loss is {loss.detach().float().cpu().tolist()} at step {self.global_step} "
                "(on at least one rank); stopped before the weights were updated. Lower the learning rate, "
                "check the data for extreme values, or raise warmup_steps; the last good checkpoint is kept."
            )
