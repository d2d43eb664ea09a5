"""Callbacks every run has: RNG state in checkpoints, the finite-loss guard, the export at the end, the step
progress bar, the checkpoint on SIGTERM; and the atomic checkpoint writer."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from medfm.progress import progress_bar

from medfm.atomic import atomic_path


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


class FiniteLossGuard(L.Callback):
    """Stops the run (on every rank) before a NaN/inf loss can reach the weights or a checkpoint, without
    reading the loss back to the host every step.

    Each step adds ``not isfinite(loss)`` to a flag kept on the device. An optimizer that can skip its own
    update on a device flag (torch's fused AdamW/Adam/SGD: the ``found_inf`` input GradScaler uses) is handed
    the flag before every step, so once a loss is non-finite no update lands, as if the step had not run
    (weights, moments and step counts unchanged). The host reads the flag every ``every_n_steps`` steps, before
    any checkpoint is written and at the end of training, and raises naming the first bad step; the last
    good checkpoint is kept. Any other optimizer is checked on the host before every update, as before.
    ``every_n_steps=1`` checks every step (one host read per step)."""

    def __init__(self, every_n_steps: int = 50):
        self.every = max(1, int(every_n_steps))
        self._bad: torch.Tensor | None = None  # device flag: some loss since the last check was not finite
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last host check

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        self._bad = bad if self._bad is None else self._bad | bad
        self._pending.append((trainer.global_step, loss))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        opt = getattr(optimizer, "_optimizer", optimizer)  # Lightning's wrapper
        if self._bad is None:
            return
        if self.every > 1 and getattr(opt, "_step_supports_amp_scaling", False) and _is_fused(opt):
            opt.found_inf = self._bad.float()  # the update is skipped on the device while the flag is set
        else:
            self.check(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check(trainer, pl_module)  # never write a checkpoint after a non-finite step

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)  # before the export

    def check(self, trainer, pl_module) -> None:
        """The host read: raises FloatingPointError naming the first non-finite step since the last check."""
        if self._bad is None:
            return
        bad = trainer.strategy.reduce_boolean_decision(bool(self._bad), all=False)
        pending, self._pending = self._pending, []
        self._bad = None
        if not bad:
            return
        step, loss = next(((s, v) for s, v in pending if not bool(torch.isfinite(v).all())), pending[-1])
        raise FloatingPointError(
            f"{type(pl_module).__name__}: loss is {loss.float().cpu().tolist()} at step {step} (on at least one "
            "rank); stopped before the weights were updated. Lower the learning rate, check the data for extreme "
            "values, or raise warmup_steps; the last good checkpoint is kept."
        )


def _is_fused(optimizer) -> bool:
    return all(g.get("fused") for g in optimizer.param_groups)


def sharded_parameters(trainer) -> bool:
    """Whether each rank holds only a shard of the weights (FSDP): rank 0 alone cannot export them then."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


class Export(L.Callback):
    """At the end of training, on rank 0: the plug-in's ``export`` hook writes what the run made
    (encoder, model, figures) into the run folder. ``done`` says whether it ran: a run resumed from a
    checkpoint at its last step (killed during the export) has no training to end, and the runner exports then."""

    def __init__(self, plugin, folder, built):
        self.plugin, self.folder, self.built = plugin, folder, built
        self.done = False

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if not sharded_parameters(trainer):  # sharded: the run exports from the gathered checkpoint instead
            self.export(trainer, pl_module)

    def export(self, trainer, pl_module) -> None:
        self.plugin.export(pl_module, self.folder, trainer, self.built)
        self.done = True


class StepProgress(ProgressBar):
    """The training progress bar of every run: optimizer steps out of ``trainer.max_steps`` (Lightning's own
    bars count epochs, which a step-keyed run does not have: "Epoch 0/-2"), the device, and the logged loss.
    A resumed run starts the bar at its checkpoint's step."""

    def __init__(self, device: str = ""):
        super().__init__()
        self._enabled = True
        self._bar = None
        self.device = device

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero:
            self._bar = progress_bar(total=trainer.max_steps, initial=trainer.global_step, unit="step", dynamic_ncols=True,
                             desc=f"training on {self.device}" if self.device else "training", leave=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        if trainer.global_step % max(trainer.log_every_n_steps, 1):
            return  # reading callback_metrics converts every logged tensor to a number: a host sync per step
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self._bar.set_postfix_str(f"loss {float(loss):.4f}", refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StopCheckpoint(L.Callback):
    """On SIGTERM (Lightning raises ``SIGTERMException`` after the current step), writes the resume checkpoint
    before the run ends, so a scheduler's stop loses nothing. Other exceptions write nothing: a NaN loss or a
    bad file must not leave a checkpoint of a broken state."""

    def __init__(self, path):
        self.path = path

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic beside the target: ``last.ckpt.tmp`` in the run's own
    ``checkpoints/`` is renamed over ``last.ckpt`` when complete (Lightning's default stages the whole file in
    the system temp folder, where a kill leaves it behind, and the result keeps that temp file's owner-only
    mode). A leftover ``.tmp`` is never read as a checkpoint and is removed when the folder is next used."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
