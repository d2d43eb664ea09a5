"""The base LightningModule of every medfm run: AdamW + warm-up/cosine over the trainable parameters.

Pretraining methods and fine-tuning tasks subclass :class:`TrainingModule`, expose the network being
trained as ``encoder`` and implement ``compute_loss(batch) -> (loss, logs)``. The optimizer is AdamW
with no weight decay on biases, norms, position embeddings and tokens (timm's grouping) over the
*trainable* parameters (torch's fused kernel on every device that has one), under linear warm-up then
cosine decay stepped every training step. The finite-loss guard is a callback
(:class:`medfm.run.callbacks.FiniteLossGuard`) that every run has; values reach the loggers on logging steps only.
"""

from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from transformers.optimization import get_cosine_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup


FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")
SCHEDULES = ("cosine", "poly")


def adamw_implementation(groups: list[dict]) -> dict:
    """``fused=True`` when every trainable parameter is a float tensor on a device with a fused AdamW kernel
    (torch picks the fused/foreach paths by itself only on CUDA; on this 2-core CPU fused made the MAE ViT-S
    step 1.07x faster than the per-parameter loop: benchmarks/speed_switches.py); foreach otherwise. Fused AdamW also lets the finite-loss guard skip a bad update on the
    device without a host read."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {"foreach": True}


def to_channels_last(model: nn.Module) -> nn.Module:
    """Every Conv2d's weights in ``channels_last`` and every Conv3d's in ``channels_last_3d`` (convolutions then
    return that layout too): the layout cuDNN's and oneDNN's fastest CNN kernels use."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.to(memory_format=torch.channels_last)
        elif isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            for p in m.parameters(recurse=False):
                if p.ndim == 5:
                    p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return model


SPEED_SWITCHES = ("compile", "channels_last", "activation_checkpointing")  # trainer keys the run applies here


def apply_speed_switches(module: L.LightningModule, trainer_cfg: dict) -> None:
    """The recipe's ``trainer`` speed switches, applied to a built module before training:
    ``channels_last`` (:func:`to_channels_last`), ``activation_checkpointing`` (the encoder recomputes its
    blocks' activations in the backward pass; under FSDP the strategy's policy does it instead) and
    ``compile`` (:meth:`TrainingModule.compile_model`), in that order."""
    if trainer_cfg.get("channels_last"):
        to_channels_last(module)
    if trainer_cfg.get("activation_checkpointing") and trainer_cfg.get("strategy") != "fsdp":
        encoder = getattr(module, "encoder", None)
        if not hasattr(encoder, "set_grad_checkpointing"):
            raise ValueError(f"trainer.activation_checkpointing: {type(encoder).__name__} cannot checkpoint its blocks")
        encoder.set_grad_checkpointing(True)
    if trainer_cfg.get("compile") and hasattr(module, "compile_model"):
        module.compile_model(trainer_cfg["compile"])


@contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode inside the block (no dropout, running statistics), its own mode back after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


class TrainingModule(L.LightningModule):
    """Base LightningModule: optimizer and schedule; subclasses supply ``encoder`` and ``compute_loss``."""

    def __init__(self, lr: float = 1.5e-4, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, max_steps: int = 1000,
                 schedule: str = "cosine"):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={schedule!r}: one of {', '.join(SCHEDULES)}")
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.max_steps, self.schedule = warmup_steps, max_steps, schedule

    @property
    def encoder(self) -> nn.Module:  # pragma: no cover - abstract
        """The encoder being trained (what a pretraining run exports)."""
        raise NotImplementedError

    # ------------------------------------------------------------ speed
    def compile_targets(self) -> list[nn.Module]:
        """What ``trainer.compile`` compiles: the method's whole ``model`` (encoder, decoder or heads, and the
        loss it computes) when it has one, else the encoder."""
        model = getattr(self, "model", None)
        return [model if isinstance(model, nn.Module) else self.encoder]

    def compile_model(self, options: bool | dict = True) -> None:
        """``torch.compile`` the :meth:`compile_targets` in place (``nn.Module.compile``: parameter names, and so
        checkpoints and exported weights, stay as they are). ``options``: True, or torch.compile's arguments."""
        opts = {} if options is True else dict(options)
        for m in self.compile_targets():
            m.compile(**opts)

    # ------------------------------------------------------------ optimizer
    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """Parameters without weight decay besides biases and norms: the encoder's ``no_weight_decay()`` (none
        for a network without a medfm encoder)."""
        if self.encoder is None:
            return []
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
        groups = self.param_groups()
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, **adamw_implementation(groups))
        if self.schedule == "poly":  # nnU-Net's: lr (1 - t)^0.9
            scheduler = get_polynomial_decay_schedule_with_warmup(optimizer, self.warmup_steps, max(self.max_steps, 1),
                                                                  lr_end=0.0, power=0.9)
        else:
            scheduler = get_cosine_schedule_with_warmup(optimizer, self.warmup_steps, max(self.max_steps, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ training
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def logs_this_step(self) -> bool:
        """Whether this step's values reach the loggers (every ``trainer.log_every_n_steps`` steps, Lightning's
        cadence). Each ``self.log`` costs Lightning ~0.7 ms even on steps it does not write (measured: 2.2 ms of
        a 7.5 ms tiny MAE step for three values), so the values are only handed over on the steps that write."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.compute_loss(batch)
        if self.logs_this_step():
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"])
            for k, v in logs.items():
                self.log(f"train/{k}", v)
        return loss
