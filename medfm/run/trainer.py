"""The Lightning Trainer every run uses, from a recipe's ``trainer`` section."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import logging
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from .callbacks import AtomicCheckpointIO, FiniteLossGuard, RngState, StepProgress
from .module import SPEED_SWITCHES

TRAINER_DEFAULTS: dict = {
    "max_steps": 1000,
    "accelerator": "auto",
    "devices": 1,
    "strategy": "auto",
    "precision": "auto",  # bf16-mixed on CUDA, 32-true on CPU (bf16 is ~500x slower on CPUs)
    "gradient_clip_val": None,
    "log_every_n_steps": 10,
    "checkpoint_every_n_steps": 500,
    # the finite-loss guard reads its device flag every N steps (fused optimizers skip a bad update on the device)
    "finite_check_every_n_steps": 50,
    "compile": False,  # torch.compile the method's model: true, or torch.compile's arguments ({mode: ..., backend: ...})
    "channels_last": False,  # convolution weights (and so activations) in channels-last layout
    "activation_checkpointing": False,  # recompute the encoder blocks' activations in the backward pass
    "enable_progress_bar": True,
    # any other lightning.Trainer argument may be added
}


# Lightning info lines every run printed: the cloud-logger advertisement ("Tip: ... litlogger"), the
# accelerator inventory ("GPU available: False, used: False", "TPU available ...", "HPU available ..."; the
# progress bar names the device instead) and the normal end of a step-budgeted run ("`Trainer.fit` stopped:
# `max_steps=N` reached.").
_DROPPED_INFO = ("litlogger", "GPU available:", "TPU available:", "HPU available:", "`Trainer.fit` stopped: `max_steps=")


class _DropKnownInfo(logging.Filter):
    """Drops the Lightning info lines named in ``_DROPPED_INFO`` from every run's console."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in _DROPPED_INFO)


def quiet_known_noise() -> None:
    """Filters exactly the third-party console lines every run printed and nobody acts on (each named here):
    the Lightning info lines of ``_DROPPED_INFO``; Lightning's own use of torch's deprecated pytree
    ``LeafSpec`` (a FutureWarning raised inside lightning.pytorch.utilities._pytree); Lightning's "Found N
    module(s) in eval mode at the start of training" (frozen encoders and text towers are in eval mode on
    purpose: their dropout and norm statistics must not change); Lightning's "logs / checkpoint directory exists
    and is not empty" on a resumed run (the folder is the run's own; RunFolder keeps its earlier log); torch's "torch.meshgrid ... indexing
    argument" UserWarning raised inside MONAI's ``build_sincos_position_embedding`` (sin-cos positions of
    the ViT and the MAE decoder); the "Loading weights" / "Writing model shards" progress bars transformers and
    huggingface_hub draw for every small text tower they load or save (medfm's own bars say what runs)."""
    import huggingface_hub.utils
    import transformers

    transformers.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownInfo) for f in logger.filters):
            logger.addFilter(_DropKnownInfo())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # a resumed run's folder holds its logs and checkpoints on purpose (RunFolder keeps the earlier log)
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", module=r"torch\.functional")


def device_description(accelerator: str = "auto") -> str:
    """The device a run uses, in words (CUDA GPUs by name, MPS, or the CPU and its threads)."""
    if accelerator != "cpu" and torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"cuda x{torch.cuda.device_count()} ({', '.join(sorted(names))})"
    if accelerator != "cpu" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return f"cpu ({torch.get_num_threads()} threads)"


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere."""
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_cuda else "32-true"


def _loggers(out: Path) -> list:
    loggers = [CSVLogger(out, name="logs", version="")]
    try:  # TensorBoard is optional: its events are written only when it is installed
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(out, name="logs", version=""))
    except ImportError:
        pass
    return loggers


def fsdp_blocks() -> set[type]:
    """The modules FSDP shards one by one (and recomputes, with activation checkpointing): timm's transformer
    ``Block``, the unit of every medfm ViT (2D and 3D encoders, the MAE decoder)."""
    from timm.models.vision_transformer import Block

    return {Block}


def make_strategy(strategy, activation_checkpointing: bool = False):
    """``trainer.strategy``: ``fsdp`` is Lightning's FSDPStrategy with every transformer block its own shard unit
    (:func:`fsdp_blocks`), full (rank-0) state-dict checkpoints that reload on any number of devices, and those
    blocks' activations recomputed in the backward pass when ``activation_checkpointing`` is set (Lightning runs
    FSDP on CUDA only); any other value goes to Lightning as it is (``auto``, ``ddp``, a Strategy object)."""
    if strategy != "fsdp":
        return strategy
    from lightning.pytorch.strategies import FSDPStrategy

    blocks = fsdp_blocks()
    return FSDPStrategy(auto_wrap_policy=blocks, activation_checkpointing_policy=blocks if activation_checkpointing else None,
                        state_dict_type="full")


def make_trainer(trainer_cfg: dict, out: Path, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """A Trainer from a recipe's ``trainer`` section (``precision: auto``, ``checkpoint_every_n_steps``, plus any
    ``lightning.Trainer`` argument): logs in ``out/logs``, resume checkpoints in ``out/checkpoints``, RNG state
    in every checkpoint, the finite-loss guard."""
    quiet_known_noise()
    t = {**TRAINER_DEFAULTS, **trainer_cfg}
    accelerator = t.pop("accelerator")
    precision = resolve_precision(t.pop("precision"), accelerator)
    every = t.pop("checkpoint_every_n_steps")
    finite_every = t.pop("finite_check_every_n_steps")
    checkpointing = t["activation_checkpointing"]
    for key in SPEED_SWITCHES:  # applied to the module by the run (medfm.run.module.apply_speed_switches)
        t.pop(key)
    strategy = make_strategy(t.pop("strategy"), checkpointing)
    progress = [StepProgress(f"{device_description(accelerator)}, {precision}")] if t["enable_progress_bar"] else []
    return L.Trainer(
        accelerator=accelerator,
        precision=precision,
        strategy=strategy,
        default_root_dir=out,
        logger=_loggers(out),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=every, save_last=True, save_top_k=1),
            RngState(),
            FiniteLossGuard(finite_every),
            *progress,
            *callbacks,
        ],
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_model_summary=False,
        **t,
    )
