"""Kill a small medfm run at a chosen stage, in a subprocess: the harness of the fault tests and of
benchmarks/reliability.py.

The run is a forked copy of the calling process (``fork=True``: torch, MONAI and medfm are imported already,
which saves ~10 s per run on a 2-core machine; only where torch runs on one thread) or a new Python process (a fresh interpreter, as a scheduler
starts one). Either way it is a real process that the signal ends.

Stages: ``step`` (after optimizer step K), ``checkpoint`` (halfway through the second write of last.ckpt),
``evaluation`` (when the fine-tuned model is being evaluated), ``export`` (artifact files written, before
the folder is swapped in). Signals: ``SIGKILL`` (kill -9: nothing runs) or ``SIGTERM`` (a scheduler's stop).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from .conftest import fork_is_safe

SCRIPT = r'''
import io, os, signal, sys
from pathlib import Path
stage, sig, at = sys.argv[1], getattr(signal, sys.argv[2]), int(sys.argv[3])
argv = sys.argv[4:]
def die():
    os.kill(os.getpid(), sig)
    import time; time.sleep(30)  # SIGTERM is handled at the next step boundary
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
import medfm.atomic, medfm.run.callbacks as cb
if stage == "step":
    orig = ModelCheckpoint.on_train_batch_end
    def hook(self, trainer, *a, **k):
        orig(self, trainer, *a, **k)
        if trainer.global_step == at:
            os.kill(os.getpid(), sig)  # SIGTERM: Lightning stops after this step
            if sig == signal.SIGKILL:
                import time; time.sleep(30)
    ModelCheckpoint.on_train_batch_end = hook
elif stage == "checkpoint":
    orig = cb.AtomicCheckpointIO.save_checkpoint
    calls = []
    def save(self, checkpoint, path, storage_options=None):
        calls.append(Path(path).name)
        if calls.count("last.ckpt") == 2 and Path(path).name == "last.ckpt":  # one complete one exists; cut this one
            buf = io.BytesIO(); torch.save(checkpoint, buf)
            Path(str(path) + ".tmp").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
        return orig(self, checkpoint, path, storage_options)
    cb.AtomicCheckpointIO.save_checkpoint = save
elif stage == "evaluation":
    from medfm.finetune.base import FinetuneTask
    def evaluate_splits(self, *a, **k):
        die()
    FinetuneTask.evaluate_splits = evaluate_splits
elif stage == "export":
    from contextlib import contextmanager
    orig_folder = medfm.atomic.atomic_folder
    @contextmanager
    def folder(target):
        with orig_folder(target) as tmp:
            yield tmp
            die()  # the artifact's files are written, the folder is not swapped in yet
    medfm.atomic.atomic_folder = folder  # every artifact (medfm.artifacts.Artifact) saves through this one function
from medfm.cli import main
sys.exit(main(argv))
'''


def tiny_argv(kind: str, data: str, out: Path) -> list[str]:
    """The command of the fault matrix: an 8-step ``--profile tiny`` MAE pretraining or LoRA fine-tuning on ``data``
    (a manifest with a ``level`` label, e.g. ``medfm.data.samples.mni152_slices``), or text MLM on the IU X-ray
    reports (whose export is a text tower: a Hugging Face folder), checkpoints every 2 steps."""
    common = ["--profile", "tiny", "--out", str(out), "--max-steps", "8",
              "trainer.checkpoint_every_n_steps=2", "trainer.enable_progress_bar=false"]
    if kind == "text_mlm":
        return ["pretrain", "text_mlm_reports", *common, "text_mlm.holdout_every=200", "data.batch_size=4"]
    common = ["--data", data, *common]
    if kind == "pretrain":
        return ["pretrain", "mae_vit_2d", *common]
    return ["finetune", "classify_2d", "--method", "lora", *common, "classification.label=level", "data.test_split=null"]


def run_killed(stage: str, signal: str, argv: list[str], at: int = 3, cwd: str | Path | None = None,
               timeout: int = 600, fork: bool = False) -> subprocess.CompletedProcess:
    """Run ``medfm ARGV`` in a process that is killed with ``signal`` at ``stage``: a new interpreter, or with
    ``fork`` a forked copy of this one (what the child prints is returned as its stderr). A fork is taken only
    where this process runs torch on one thread (``make test`` sets OMP_NUM_THREADS=1): a forked copy of a
    running multi-threaded OpenMP pool hangs at its next parallel region."""
    if not (fork and fork_is_safe()):
        return subprocess.run([sys.executable, "-c", SCRIPT, stage, signal, str(at), *argv], capture_output=True,
                              text=True, cwd=cwd, timeout=timeout)
    with tempfile.TemporaryFile() as log:
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller (the test runner)
            code = 1
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                if cwd is not None:
                    os.chdir(cwd)
                sys.argv = ["-c", stage, signal, str(at), *argv]
                exec(compile(SCRIPT, "<fault injection>", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.time() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.05)
        log.seek(0)
        err = log.read().decode(errors="replace")
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), "", err)


def weights(run: Path) -> dict:
    """The run's main artifact's tensors (``encoder/`` of a pretraining run, ``model/`` of a fine-tuning run)."""
    info = json.loads((run / "run.json").read_text())
    return load_file(str(run / info.get("model", "model") / "model.safetensors"))


def same_result(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two finished runs hold bit-identical weights and the same metrics (timings aside)."""
    wa, wb = weights(a), weights(b)
    if wa.keys() != wb.keys() or not all(bool((wa[k] == wb[k]).all()) for k in wa):
        return False, "weights differ"
    ma, mb = (json.loads((r / "metrics.json").read_text()) if (r / "metrics.json").exists() else {} for r in (a, b))
    for m in (ma, mb):
        for key in ("wall_time_s", "train_time_s"):
            m.pop(key, None)
    return (ma == mb, "" if ma == mb else "metrics differ")


def partial_files(run: Path) -> list[str]:
    """Temporary files or folders left in the run folder (never read as complete ones)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith((".tmp", ".old")))
