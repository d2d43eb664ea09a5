"""torchxrayvision DenseNet-121 and ResNet-50 from exported state dicts: parity with the upstream models
(random weights), 3D inflation, the pickled release format refused, LoRA fine-tuning from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
import torchxrayvision as xrv

import medfm
from medfm.cli import main
from medfm.encoders import create_encoder, saved_architecture
from medfm.encoders.formats import identify, open_checkpoint

from .public_helpers import QUIET


def _xrv_input(x: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's normalisation (``xrv.datasets.normalize``: ``(2 * img / maxval - 1) * 1024``) of an
    image in [0, 1], in float32 as the model sees it."""
    ref = torch.as_tensor(xrv.datasets.normalize((x * 255).double().numpy(), 255)).float()
    assert torch.allclose(ref, (2 * x - 1) * 1024, atol=1e-3)
    return (2 * x - 1) * 1024


@pytest.fixture(scope="module")
def xrv_densenet(tmp_path_factory):
    torch.manual_seed(0)
    ref = xrv.models.DenseNet(weights=None).eval()
    with torch.no_grad():  # running statistics away from 0 / 1, so BatchNorm conversion errors show
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("xrv") / "xrv_densenet.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_xrv_densenet_parity_and_3d_inflation(xrv_densenet):
    ref, path = xrv_densenet
    assert identify(open_checkpoint(path)).name == "xrv-densenet121"
    assert saved_architecture(path)["name"] == "densenet121"
    ours = create_encoder("densenet121", img_size=64, pretrained=path).eval()  # the classifier is not converted
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.features2(_xrv_input(x)), rtol=1e-5, atol=1e-5)
        maps = ours.forward_intermediates(x)
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]
    with pytest.warns(UserWarning, match="inflated"):
        vol = create_encoder("densenet121", spatial_dims=3, pretrained=path).eval()
    with torch.no_grad():
        assert vol(torch.rand(1, 1, 32, 32, 32)).shape == (1, 1024)


def test_xrv_resnet50_parity(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(num_classes=18, weights=None)  # what xrv.models.ResNet builds
    ref.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    ref.eval()
    path = tmp_path / "xrv_resnet50.pth"
    torch.save(ref.state_dict(), path)
    assert identify(open_checkpoint(path)).name == "xrv-resnet50"
    ours = create_encoder("resnet50", img_size=64, pretrained=path).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(ref.children())[:-1])
        torch.testing.assert_close(ours(x), trunk(_xrv_input(x)).flatten(1), rtol=1e-5, atol=1e-5)


def test_the_pickled_release_file_is_refused_with_how_to_export(tmp_path, capsys):
    """torchxrayvision ships whole pickled modules: one line, exit 2, how to export the state dict."""
    path = tmp_path / "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    torch.save(xrv.models.DenseNet(weights=None), path)
    assert main(["models", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "refused" in err and "state_dict()" in err


@pytest.mark.slow  # a DenseNet run
def test_xrv_densenet_finetunes_from_the_cli_and_reloads(xrv_densenet, slices, tmp_path):
    _, path = xrv_densenet
    run = tmp_path / "lora"
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--encoder", str(path), "--method", "lora",
                 "--data", slices, "--out", str(run), "classification.label=level", *QUIET]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["encoder"] == "densenet121" and 0 < metrics["trainable_params"] < metrics["total_params"]
    model = medfm.load(run)
    assert type(model.encoder.base_model.model).__name__ == "DenseNetEncoder"
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.rand(2, 1, 32, 32))).all()
