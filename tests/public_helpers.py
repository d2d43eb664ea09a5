"""What every public-model test does once converted: LoRA fine-tuning through the CLI on real MNI152 slices,
evaluation, and a reload of the run alone."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import medfm
from medfm.cli import main

QUIET = ["trainer.enable_progress_bar=false", "data.test_split=null"]


def finetune_lora_cli(encoder: Path | str, slices: str, out: Path, *extra: str, recipe: str = "classify_2d") -> dict:
    """``medfm finetune RECIPE --profile tiny --encoder ENCODER --method lora``: trains, evaluates, reloads."""
    label = ["classification.label=level"] if recipe.startswith("classify") else ["segmentation.num_classes=3"]
    method = ["--method", "lora"]
    assert main(["finetune", recipe, "--profile", "tiny", "--encoder", str(encoder), *method, "--data", slices,
                 "--out", str(out), *label, *QUIET, *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model = medfm.load(out)  # the run alone: config + safetensors (+ the LoRA adapter)
    size = model.spec["preprocess"]["size"]
    size = [size] * 2 if isinstance(size, int) else size
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.rand(2, 1, *size))).all()
    return metrics
