"""The run folder: created once, never overwritten silently, resumed from its last checkpoint.

Layout (every run kind): ``recipe.yaml`` (the resolved recipe, written atomically), ``run.json`` (what
kind of run this is and which sub-folder is its model), ``checkpoints/last.ckpt`` (full resume state),
``logs/metrics.csv`` (a resumed run keeps the earlier log as ``logs/metrics-partN.csv``), then what the
plug-in exports: artifact folders (``config.json`` + ``model.safetensors``), ``metrics.json``, figures.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from medfm.artifacts import read_run_info, write_run_info
from medfm.atomic import write_text

RECIPE_NAME = "recipe.yaml"


class RunFolder:
    """One run's folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.ckpt"

    def prepare(self, resume: bool) -> Path | None:
        """Check the folder against ``resume`` (never overwrite a run silently); the checkpoint to resume."""
        ckpt = self.checkpoint
        if resume and not ckpt.exists():
            raise FileNotFoundError(f"{ckpt}: nothing to resume (no checkpoint in the run folder)")
        if not resume and ckpt.exists():
            raise FileExistsError(f"{self.path} already holds a run; pass --resume to continue it, or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        if resume:
            self._keep_logs()
        return ckpt if resume else None

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
