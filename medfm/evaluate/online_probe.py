"""The online probe: a linear probe on frozen encoder features, run periodically during pretraining."""

from __future__ import annotations

import time

import lightning as L
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .probe import embed_dataset, logistic_probe


class OnlineProbe(L.Callback):
    """Every ``every_n_steps`` (and at the end), a logistic-regression probe on frozen encoder features.

    ``train`` and ``val`` are labelled sample datasets already resized to the
    encoder's input size. Logs ``probe/auroc``, ``probe/accuracy`` and
    ``probe/balanced_accuracy``; every rank computes it (same data, no
    randomness), only rank 0 logs, and prints one line per probe (its AUROC, its sizes and how long it
    took) so a pause in the training bar is explained.
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
        t0 = time.perf_counter()
        metrics = self.run(pl_module)
        if trainer.is_global_zero:
            when = f"every {self.every_n_steps} steps" if self.every_n_steps else "at the end"
            tqdm.write(f"online probe at step {trainer.global_step}: AUROC {metrics['auroc']:.3f} (logistic regression on "
                       f"frozen features, {len(self.train)} train / {len(self.val)} val images, "
                       f"{time.perf_counter() - t0:.1f} s; {when})")
        for logger in trainer.loggers:
            logger.log_metrics({f"probe/{k}": v for k, v in metrics.items()}, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.every_n_steps or trainer.global_step % self.every_n_steps:
            self._log(trainer, pl_module)
