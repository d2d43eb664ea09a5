"""medfm is extended from outside its own files: a new encoder family and a new task, each one class (or one
module) plus one registration, defined here in the test module, then run through the command line exactly
as the built-in ones are (pretraining, LoRA fine-tuning, segmentation, evaluation, reload)."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics.functional as tmf
from timm.models._features import feature_take_indices
from torch.utils.data import Dataset

import medfm
from medfm.cli import main
from medfm.data import samples
from medfm.encoders import (Encoder, EncoderBase, create_encoder, layer_decay_param_groups, register_encoder,
                            unregister_encoder)
from medfm.run import TrainingModule
from medfm.finetune import TASKS, FinetuneTask, TaskModel, build_task_encoder

QUIET = ["trainer.enable_progress_bar=false"]


# ----------------------------------------------------------------- a new encoder family: one class + one builder
class TinyConvEncoder(EncoderBase):
    """A plain ``torch.nn.Sequential`` of two strided convolution stages as a medfm encoder (2D or 3D)."""

    feature_maps = "pyramid"  # maps at strides 2 and 4: the U-Net decoder uses both
    lora_targets = r"net\.\d+\.conv"
    input_conv = "net.0.conv.weight"

    def __init__(self, spatial_dims: int = 2, in_chans: int = 1, img_size: int = 32, width: int = 16):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims, self.in_chans, self.embed_dim = spatial_dims, in_chans, 2 * width
        self.patch_size = (4,) * spatial_dims
        self.net = nn.Sequential(*[
            nn.Sequential(OrderedDict(conv=conv(c_in, c_out, 3, stride=2, padding=1), act=nn.GELU()))
            for c_in, c_out in ((in_chans, width), (width, 2 * width))
        ])

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[torch.Tensor]:
        take, last = feature_take_indices(len(self.net), indices)
        maps = []
        for i, stage in enumerate(self.net[: last + 1]):
            x = stage(x)
            maps.append(x)
        return [maps[i] for i in take]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.net)


def tiny_conv(spatial_dims: int = 2, in_chans: int = 1, img_size=32, **kwargs) -> TinyConvEncoder:
    """Two strided convolutions (test family)."""
    return TinyConvEncoder(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **kwargs)


@pytest.fixture
def tiny_conv_family():
    register_encoder(tiny_conv)  # the one registration
    yield "tiny_conv"
    unregister_encoder("tiny_conv")


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> str:
    """Real MNI152 axial slices with tissue label maps and a ``level`` class, 32 px."""
    return str(samples.mni152_slices(tmp_path_factory.mktemp("slices"), n=24, size=32))


def test_a_new_encoder_family_pretrains_finetunes_with_lora_segments_and_reloads(tiny_conv_family, slices, tmp_path,
                                                                                 capsys):
    enc = create_encoder("tiny_conv", spatial_dims=3, img_size=32)
    assert isinstance(enc, Encoder) and enc(torch.rand(2, 1, 32, 32, 32)).shape == (2, 32)
    # layer-wise LR decay from the family's encoder_blocks alone (EncoderBase's default group_matcher)
    groups = layer_decay_param_groups(enc, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert sorted({g["lr"] for g in groups}) == pytest.approx([5e-4, 1e-3])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in enc.parameters())

    # pretraining (DINO: any encoder with a pooled embedding); the tiny profile's ViT patch_size is dropped
    pre = tmp_path / "dino"
    assert main(["pretrain", "dino_vit_2d", "--profile", "tiny", "--data", slices, "--out", str(pre),
                 "encoder.name=tiny_conv", *QUIET]) == 0
    assert "encoder.patch_size: 8 dropped" in capsys.readouterr().out
    saved = json.loads((pre / "encoder" / "config.json").read_text())
    assert saved["architecture"] == "tiny_conv" and saved["medfm_class"].endswith(":TinyConvEncoder")
    assert type(medfm.load(pre)).__name__ == "TinyConvEncoder"

    # LoRA fine-tuning from that run: the architecture comes from the saved folder, LoRA from lora_targets
    cls = tmp_path / "lora"
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--encoder", str(pre), "--method", "lora",
                 "--data", slices, "--out", str(cls), "classification.label=level", "data.test_split=null", *QUIET]) == 0
    metrics = json.loads((cls / "metrics.json").read_text())
    assert metrics["encoder"] == "tiny_conv" and 0 < metrics["trainable_params"] < metrics["total_params"]
    assert (cls / "adapter" / "adapter_config.json").exists() and "val" in metrics

    # segmentation: the U-Net decoder over the family's pyramid of maps
    seg = tmp_path / "seg"
    assert main(["finetune", "segment_2d", "--profile", "tiny", "--encoder", str(pre), "--data", slices,
                 "--out", str(seg), "segmentation.num_classes=3", "data.test_split=null", *QUIET]) == 0
    assert 0.0 <= json.loads((seg / "metrics.json").read_text())["val"]["mean_dice"] <= 1.0

    # reload: each run's model alone, and through `medfm evaluate`
    x = torch.rand(2, 1, 32, 32)
    for run in (cls, seg):
        model = medfm.load(run)
        assert type(model.encoder.base_model.model if run == cls else model.encoder).__name__ == "TinyConvEncoder"
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()
    assert main(["evaluate", str(cls), "--split", "val"]) == 0
    assert json.loads((cls / "eval_val" / "metrics.json").read_text())["val"]["auroc"] == metrics["val"]["auroc"]


# ----------------------------------------------------------------- a new task: one module's worth + one registration
@dataclass
class RegressionConfig:
    """``toy_regression`` recipe section."""

    target: str = "height"  # manifest column with the number to predict


class RegressionModel(TaskModel, nn.Module):
    """Encoder -> pooled embedding -> one linear output."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "RegressionModel":
        model = cls(build_task_encoder(spec, pretrained))
        model.spec = spec
        return model


class RegressionModule(TrainingModule):
    def __init__(self, model: RegressionModel, layer_decay: float | None = None, **optim):
        super().__init__(**optim)
        self.model = model

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return F.mse_loss(self.model(batch["image"]), batch["label"].float()), {}


class Targets(Dataset):
    """A manifest split with a numeric column as ``label``."""

    def __init__(self, ds, column: str):
        self.ds, self.column, self.records = ds, column, ds.records

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "label": torch.tensor(float(self.records[i].extra[self.column]))}


class Regression(FinetuneTask):
    name = "toy_regression"
    Config = RegressionConfig
    model_class = RegressionModel
    headline = ("mae", "r2")

    def split_args(self, cfg: dict, path: str) -> dict:
        return {}

    def open_split(self, cfg: dict, split, train: bool = False, path: str | None = None):
        return Targets(super().open_split(cfg, split, train, path), self.config(cfg).target)

    def head(self, cfg: dict, state: dict) -> dict:
        return {}

    def module(self, cfg: dict, model, train, state: dict):
        return RegressionModule(model, **self.optim(cfg))

    @torch.no_grad()
    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:
        model.eval()
        pred = torch.stack([model(ds[i]["image"][None])[0] for i in range(len(ds))])
        target = torch.stack([ds[i]["label"] for i in range(len(ds))])
        return {"n": len(ds), "mae": float(tmf.mean_absolute_error(pred, target)), "r2": float(tmf.r2_score(pred, target))}


@pytest.fixture
def regression_task():
    TASKS.register(Regression)  # the one registration
    yield "toy_regression"
    TASKS.pop("toy_regression")


def test_a_new_task_trains_evaluates_and_reloads_through_the_cli(regression_task, slices, tmp_path, capsys):
    import csv

    rows = list(csv.DictReader(open(slices)))
    for r in rows:  # the slice's height in the brain, from its file name (z index / 100), as the target
        r["height"] = int(r["image"].split("_z")[1].split(".")[0]) / 100
    manifest = Path(slices).with_name("regression.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    recipe = tmp_path / "regress_2d.yaml"
    recipe.write_text("task: toy_regression\nmethod: full\ntoy_regression:\n  target: height\n"
                      "data:\n  preset: radiograph_2d\n  test_split: null\n")
    run = tmp_path / "reg"
    assert main(["finetune", str(recipe), "--profile", "tiny", "--data", str(manifest), "--out", str(run),
                 "--max-steps", "30", "optim.lr=3e-4", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "val" in out and "mae" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "toy_regression" and metrics["val"]["n"] == 6 and metrics["val"]["mae"] >= 0
    losses = [float(r["train/loss"]) for r in csv.DictReader(open(run / "logs" / "metrics.csv")) if r.get("train/loss")]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])  # a real loss that falls

    model = medfm.load(run)
    assert isinstance(model, RegressionModel) and model.spec["task"] == "toy_regression"
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    again = json.loads((run / "eval_val" / "metrics.json").read_text())["val"]
    assert again["mae"] == pytest.approx(metrics["val"]["mae"], rel=1e-5)
