"""Lightning callbacks of a pretraining run: RNG state in checkpoints, online probe, MAE figure, encoder export."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import Dataset


class RngState(L.Callback):
    """Saves the global torch / CUDA / numpy / python RNG states in every checkpoint and restores them on resume.

    Lightning restores model, optimizer, scheduler and loop counters, not the
    RNG streams; without them a resumed run draws different masks than an
    uninterrupted one. States are stored as tensors and plain lists so the
    checkpoint loads with ``torch.load(weights_only=True)``. They are applied
    at ``on_train_start``, after everything that runs while restoring.
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        s, self._pending = self._pending, None
        if s is None:
            return
        torch.set_rng_state(s["torch"])
        kind, keys, pos, has_gauss, gauss = s["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])


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
        from medfm.evaluate.probe import embed_dataset, logistic_probe

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


def _mid_slice(x: torch.Tensor) -> np.ndarray:
    """First channel of a (C, H, W) image or the middle depth slice of a (C, D, H, W) volume."""
    x = x[0]
    if x.ndim == 3:
        x = x[x.shape[0] // 2]
    return x.float().cpu().numpy()


def save_mae_figure(model, images: torch.Tensor, path: str | Path) -> Path:
    """PNG with one row per sample: masked input, reconstruction, target (mid-slice for volumes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    try:
        out = model.reconstruct(images)
    finally:
        model.train(was_training)
    n = images.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        t = _mid_slice(out["target"][i])
        lo, hi = float(t.min()), float(t.max())
        for j, key in enumerate(("masked", "reconstruction", "target")):
            ax = axes[i, j]
            ax.imshow(_mid_slice(out[key][i]), cmap="gray", vmin=lo, vmax=hi)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(key)
    fig.suptitle(f"MAE, mask ratio {model.mask_ratio:.2f}, loss {float(out['loss']):.3f}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_encoder_atomically(encoder, folder: Path) -> None:
    """``save_pretrained`` into a temporary folder, then swap it in: a crash never leaves half a folder."""
    import shutil

    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


class FinishRun(L.Callback):
    """At the end of training (rank 0): the encoder as ``save_pretrained`` in ``RUN/encoder``, and for
    MAE a reconstruction figure of the first ``figure_samples`` views. (``ModelCheckpoint`` writes
    the final ``last.ckpt`` itself.)"""

    def __init__(self, out: str | Path, figure_samples: int = 4):
        self.out = Path(out)
        self.figure_samples = figure_samples

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        save_encoder_atomically(pl_module.encoder, self.out / "encoder")
        if hasattr(pl_module, "export"):  # what a method saves besides the encoder (CLIP: text tower, heads)
            pl_module.export(self.out)
        model = getattr(pl_module, "model", None)
        if hasattr(model, "reconstruct") and self.figure_samples:
            views = trainer.datamodule.fixed_views(self.figure_samples)
            device = next(pl_module.parameters()).device
            save_mae_figure(model, views.to(device), self.out / "mae_reconstruction.png")
