"""The online probe: a linear probe on frozen encoder features, run periodically during pretraining."""

from __future__ import annotations

import lightning as L
from torch.utils.data import Dataset

from .probe import embed_dataset, logistic_probe


class OnlineProbe(L.Callback):
    """Every ``every_n_steps`` (and at the end), a logistic-regression probe on frozen encoder features.

    ``train`` and ``val`` are labelled sample datasets already resized to the
    encoder's input size. Logs ``probe/auroc``, ``probe/accuracy`` and
    ``probe/balanced_accuracy``; every rank computes it (same data, no
    randomness), only rank 0 logs.
    """

    def __init__(self, train: Dataset, val: Dataset, every_n_steps: int, batch_size: int = 64):
        self.train, self.val = train, val
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.last: dict | None = None

    def run(self, pl_module) -> dict:
        xt, yt = embed_dataset(pl_module.encoder, self.train, self.batch_size)
        xv, yv = embed_dataset(pl_module.encoder, self.val, self.batch_size)
        metrics = logistic_probe(xt, yt, xv, yv)
        self.last = {k: v for k, v in metrics.items() if k != "val_scores"}
        return self.last

    def _log(self, trainer, pl_module) -> None:
        metrics = self.run(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({f"probe/{k}": v for k, v in metrics.items()}, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.every_n_steps or trainer.global_step % self.every_n_steps:
            self._log(trainer, pl_module)
