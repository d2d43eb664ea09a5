"""The encoder source resolved once (medfm.encoders.source): a run started from a public folder converts it once,
keeps what it converted (evaluates and reloads after the folder is gone), and medfm.load and
create_model_and_transforms take the same public folders; a converted DINOv2 keeps its native position grid."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import medfm
from medfm.cli import main
from medfm.encoders import create_model_and_transforms
from medfm.encoders.formats import CONVERSIONS
from medfm.encoders.source import encoder_folder, forget_sources, resolve_source

from .public_helpers import QUIET

TOL = dict(rtol=1e-5, atol=1e-5)


def _dinov2_folder(tmp_path, image_size: int, name: str = "dinov2"):
    """A tiny Hugging Face ``Dinov2Model`` saved at ``image_size`` with no preprocessor config (random weights)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                                     patch_size=14, layerscale_value=0.5)).eval()
    with torch.no_grad():
        for p in model.embeddings.parameters():
            p.normal_()
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


def _imagenet(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


@pytest.mark.parametrize("image_size", [56, 224])
def test_dinov2_keeps_its_native_grid_and_matches_transformers(tmp_path, image_size):
    """Saved at 56 px (a 4 x 4 grid) with no preprocessor config, the model is built at 224 (the default crop)
    but its position grid stays 4 x 4: at its own 56 px medfm's tokens are transformers' (and at a 224 native
    grid too); ``medfm.load`` and ``create_model_and_transforms`` give the same network."""
    ref, folder = _dinov2_folder(tmp_path, image_size)
    model, transform = create_model_and_transforms(folder)
    assert model.pos_grid == (image_size // 14,) * 2 and model.preprocess["size"] == 224
    loaded = medfm.load(folder)
    x = torch.rand(2, 1, image_size, image_size)
    with torch.no_grad():
        want = ref(pixel_values=_imagenet(x))
        torch.testing.assert_close(model.eval().forward_features(x), want.last_hidden_state, **TOL)
        torch.testing.assert_close(model(x), want.pooler_output, **TOL)
        torch.testing.assert_close(loaded.eval()(x), model(x), **TOL)
    assert transform is not None


def test_medfm_load_takes_what_encoder_takes(tmp_path):
    """A public folder, a medfm encoder folder and a run folder: medfm.load reads each (before, a public folder was
    refused: "config.json has no 'medfm_class' entry")."""
    _, folder = _dinov2_folder(tmp_path, 28)
    enc = medfm.load(folder)
    enc.save_pretrained(tmp_path / "saved")
    again = medfm.load(tmp_path / "saved")
    x = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), enc.eval()(x))
    assert again.preprocess == enc.preprocess
    assert encoder_folder(tmp_path / "saved") == str(tmp_path / "saved")
    assert resolve_source(tmp_path / "saved").kind == "medfm" and resolve_source(folder).kind == "public"


def test_a_run_from_a_public_folder_converts_once_and_outlives_it(tmp_path, slices, capsys):
    """``medfm finetune --encoder HF_FOLDER``: the checkpoint is converted once in the run (architecture and
    weights from one conversion); with the folder deleted, the run evaluates and reloads."""
    _, folder = _dinov2_folder(tmp_path, 28, name="public_dinov2")
    forget_sources()
    CONVERSIONS.clear()
    run = tmp_path / "run"
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--encoder", str(folder), "--method", "lora",
                 "--data", slices, "--out", str(run), "classification.label=level", *QUIET]) == 0
    assert sum(CONVERSIONS.values()) == 1, dict(CONVERSIONS)
    recipe = (run / "recipe.yaml").read_text()
    assert "pos_size: 28" in recipe and str(folder) in recipe  # what it converted, and where from
    shutil.rmtree(folder)
    forget_sources()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    assert "auroc" in capsys.readouterr().out
    assert json.loads((run / "eval_val" / "metrics.json").read_text())["val"]["n"] > 0
    model = medfm.load(run)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.rand(2, 1, 28, 28))).all()
    assert sum(CONVERSIONS.values()) == 1  # evaluation and reload never read the (deleted) source


def test_the_most_specific_format_wins_whatever_the_import_order(tmp_path, monkeypatch):
    """An original DINOv2 checkpoint also fits the timm layout's key patterns: the original format is chosen
    because it declares itself more specific, in any registration order; two formats that fit with no declared
    order are an error naming both."""
    from medfm.encoders import formats
    from medfm.encoders.formats import Checkpoint, Format, identify

    sd = {"mask_token": torch.zeros(1, 8), "cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
          "patch_embed.proj.weight": torch.zeros(8, 3, 14, 14), "blocks.0.ls1.gamma": torch.zeros(8)}
    ckpt = Checkpoint("dinov2_vits14_pretrain.pth", sd)
    registered = dict(formats._FORMATS)
    for order in (list(registered), list(reversed(registered))):
        monkeypatch.setattr(formats, "_FORMATS", {n: registered[n] for n in order})
        assert identify(ckpt).name == "dinov2-original"
    rival = Format(name="rival", architecture="dinov2", source="a test layout", preprocess="", license="", example="",
                   keys=(r"^mask_token$",), convert=lambda c: None)
    monkeypatch.setattr(formats, "_FORMATS", {**registered, "rival": rival})
    with pytest.raises(ValueError, match="fits 2 formats .*dinov2-original, rival|fits 2 formats .*rival"):
        identify(ckpt)
