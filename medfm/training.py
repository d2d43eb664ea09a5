"""What every medfm LightningModule and run shares: AdamW + warm-up/cosine, the NaN guard, the Trainer.

Pretraining methods (``medfm.pretrain``) and fine-tuning tasks (``medfm.tasks``)
subclass :class:`TrainingModule` and implement ``compute_loss(batch) -> (loss,
logs)``. The optimizer is AdamW with no weight decay on biases, norms, position
embeddings and tokens (timm's grouping) over the *trainable* parameters, under
linear warm-up then cosine decay stepped every training step.
:func:`make_trainer` builds the Lightning Trainer every run uses: CSV (and
TensorBoard) logs, ``checkpoints/last.ckpt`` with full resume state (RNG
included), fp32 on CPU and bf16 autocast on CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from timm.optim import param_groups_weight_decay
from transformers.optimization import get_cosine_schedule_with_warmup


class TrainingModule(L.LightningModule):
    """Base LightningModule: optimizer, schedule and a NaN/inf guard around ``compute_loss``."""

    def __init__(self, lr: float = 1.5e-4, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, max_steps: int = 1000):
        super().__init__()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.max_steps = warmup_steps, max_steps

    @property
    def encoder(self) -> nn.Module:  # pragma: no cover - abstract
        """The encoder being trained (exported with ``save_pretrained`` at the end of a run)."""
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


class StepData(L.LightningDataModule):
    """Endless, step-addressed training batches of a dataset keyed by ``(index, position)``
    (:class:`medfm.pretrain.views.StepSampler`): every rank sees different samples, and a resumed run
    continues exactly where the stopped one would have gone. ``n`` is the number of indices (None: an
    endless source, index = position)."""

    def __init__(self, keyed: Dataset, n: int | None, batch_size: int, num_workers: int = 0, seed: int = 0,
                 collate_fn=None):
        super().__init__()
        self.keyed, self.n = keyed, n
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.collate_fn = collate_fn

    def train_dataloader(self) -> DataLoader:
        from medfm.pretrain.views import StepSampler

        t = self.trainer
        sampler = StepSampler(self.n, self.batch_size, seed=self.seed, rank=t.global_rank,
                              world_size=t.world_size, start_step=t.global_step)
        return DataLoader(
            self.keyed,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),  # keep the global RNG untouched
        )


def make_trainer(trainer_cfg: dict, out: Path, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """A Trainer from a recipe's ``trainer`` section (``precision: auto``, ``checkpoint_every_n_steps``,
    plus any ``lightning.Trainer`` argument): logs in ``out/logs``, resume checkpoints in ``out/checkpoints``."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from medfm.pretrain.callbacks import RngState

    t = dict(trainer_cfg)
    precision = t.pop("precision")
    accelerator = t.pop("accelerator")
    if precision == "auto":
        on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        precision = "bf16-mixed" if on_cuda else "32-true"
    every = t.pop("checkpoint_every_n_steps")
    loggers = [CSVLogger(out, name="logs", version="")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(out, name="logs", version=""))
    except ImportError:
        pass
    return L.Trainer(
        accelerator=accelerator,
        precision=precision,
        default_root_dir=out,
        logger=loggers,
        callbacks=[
            ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=every, save_last=True, save_top_k=1),
            RngState(),
            *callbacks,
        ],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_model_summary=False,
        **t,
    )


def keep_logs(logs: Path) -> None:
    """Lightning's CSV logger deletes an existing metrics.csv; a resumed run keeps it as metrics-partN.csv."""
    current = logs / "metrics.csv"
    if current.exists():
        n = len(list(logs.glob("metrics-part*.csv"))) + 1
        current.rename(logs / f"metrics-part{n}.csv")


def prepare_run_folder(out: Path, resume: bool) -> Path | None:
    """Check ``out`` against ``resume`` (never overwrite a run silently); returns the checkpoint to resume."""
    ckpt = out / "checkpoints" / "last.ckpt"
    if resume and not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: nothing to resume (no checkpoint in the run folder)")
    if not resume and ckpt.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        keep_logs(out / "logs")
    return ckpt if resume else None
