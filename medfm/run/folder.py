"""The run folder: created once, never overwritten silently, resumed from its last checkpoint.

Layout (every run kind): ``recipe.yaml`` (the resolved recipe, written atomically), ``run.json`` (what
kind of run this is and which sub-folder is its model), ``checkpoints/last.ckpt`` (full resume state),
``logs/metrics.csv`` (a resumed run keeps the earlier log as ``logs/metrics-partN.csv``), then what the
plug-in exports: artifact folders (``config.json`` + ``model.safetensors``), ``metrics.json``, figures.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import yaml

from medfm.artifacts import load_tensors, read_run_info, write_run_info
from medfm.atomic import write_text

RECIPE_NAME = "recipe.yaml"
# what a run leaves in its folder: a folder holding any of these is a run's, never overwritten silently
OUTPUTS = (RECIPE_NAME, "run.json", "metrics.json", "checkpoints", "logs", "model", "encoder", "adapter")


def launched_rank() -> bool:
    """True in a process that a multi-process launcher (Lightning DDP, torchrun, SLURM) started as rank > 0."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class RunFolder:
    """One run's folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.ckpt"

    def outputs(self) -> list[str]:
        """The run outputs already in the folder (see ``OUTPUTS``)."""
        return [name for name in OUTPUTS if (self.path / name).exists()]

    def prepare(self, resume: bool, overwrite: bool = False) -> Path | None:
        """Check the folder against ``resume`` / ``overwrite`` (never overwrite a run silently); the checkpoint
        to resume. A folder holding any run output is refused unless resumed (it needs its checkpoint) or
        ``overwrite`` (its run outputs are deleted first; other files are left)."""
        ckpt = self.checkpoint
        if launched_rank():  # a DDP worker process: rank 0 checked and prepared the folder
            return ckpt if resume else None
        if resume and overwrite:
            raise ValueError("--resume continues a run and --overwrite replaces it: give one of them")
        if resume and not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: nothing to resume (the run stopped before its first checkpoint); "
                                    "start it again with --overwrite")
        found = self.outputs()
        if found and not resume and not overwrite:
            raise FileExistsError(f"{self.path} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another --out")
        if overwrite:
            for name in found:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (self.path / "checkpoints").glob("*.tmp"):  # a checkpoint write cut short by a kill
            stale.unlink()
        if resume:
            self._check_checkpoint(ckpt)
            self._keep_logs()
        return ckpt if resume else None

    @staticmethod
    def _check_checkpoint(ckpt: Path) -> None:
        """A resume checkpoint must hold tensors and plain data only (``weights_only``): the folder may have been
        written by someone else, and unpickling anything more can run code. Read once here, before training."""
        try:
            load_tensors(ckpt, "start the run again with --overwrite")
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "start the run again with --overwrite") from None

    def lock(self) -> None:
        """Hold the folder for this process (released when the process ends or ``unlock``): a second run on the
        same folder is refused instead of both writing checkpoints and logs into it."""
        if launched_rank():
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "a+")
        except OSError as e:
            raise ValueError(f"--out {self.path}: cannot make or write the run folder here ({e.strerror or e})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FileExistsError(f"{self.path} is in use by {holder}; wait for it to finish or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        handle = getattr(self, "_lock", None)
        if handle is not None:
            handle.close()
            (self.path / ".lock").unlink(missing_ok=True)
            self._lock = None

    def _keep_logs(self) -> None:
        """Lightning's CSV logger deletes an existing metrics.csv; a resumed run keeps it as metrics-partN.csv."""
        logs = self.path / "logs"
        current = logs / "metrics.csv"
        if current.exists():
            n = len(list(logs.glob("metrics-part*.csv"))) + 1
            current.rename(logs / f"metrics-part{n}.csv")

    def write_recipe(self, cfg: dict) -> None:
        write_text(self.path / RECIPE_NAME, yaml.safe_dump(cfg, sort_keys=False))

    def read_recipe(self) -> dict:
        path = self.path / RECIPE_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: not a medfm run folder (no {RECIPE_NAME})")
        return yaml.safe_load(path.read_text())

    def write_info(self, **info) -> None:
        write_run_info(self.path, **info)

    def info(self) -> dict:
        return read_run_info(self.path)

    def summary_line(self, model: str) -> str:
        """One line saying where a finished run's weights, metrics, figures and logs are."""
        parts = [f"model {self.path / model}"]
        if (self.path / "metrics.json").exists():
            parts.append(f"metrics {self.path / 'metrics.json'}")
        figures = sorted(p.name for p in self.path.glob("*") if p.suffix in (".png", ".html"))
        if figures:
            parts.append("figures " + ", ".join(figures))
        parts.append(f"logs {self.path / 'logs' / 'metrics.csv'}")
        return f"run finished: {self.path} | " + " | ".join(parts)

    def save(self, artifact, name: str) -> Path:
        """``artifact.save_pretrained`` into the sub-folder ``name`` (every medfm ``save_pretrained`` swaps its
        folder in atomically)."""
        artifact.save_pretrained(self.path / name)
        return self.path / name
